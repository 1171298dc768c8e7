"""GGUF files (llama.cpp's format) as model input: checked, converted once into the cache.

A GGUF holds block-quantized weights (Q4_K, Q4_1, Q6_K, ...) plus the tokenizer and chat
template as metadata. Our pipeline reads Hugging Face safetensors folders, so a GGUF is
dequantised with transformers' GGUF loader (which also rebuilds the tokenizer and chat template
from the metadata) and saved once as a plain fp32 safetensors folder under the cache; later runs
reuse it. The bundled default model (`sinq_export.models.default_model_dir`) goes through the
same `convert`.

Before anything is written, the file is checked with the ``gguf`` package's reader: the magic,
a header that parses and tensor data that fits inside the file (a truncated download), an
architecture we can export, and tokenizer metadata. Any failure is one `ModelLoadError` line
naming the file and the problem, and nothing is left in the cache.

Why fp32 folders: dequantised k-quant values (``d * scale * q - dmin * min``) are not exactly
representable in fp16/bf16, so halving the disk use would change the weights we quantize and
validate against; the float folder is what every later stage reads.

Caveat: the weights of a quantized GGUF already sit on a low-bit grid. Re-quantizing them with
SINQ compounds the two errors (the GGUF's and ours) unless our grid reproduces theirs (e.g.
4-bit, group 32, asymmetric on a Q4_1 source); the conversion marker records the source's
quantization types (`source_quantization`) so the export manifest can say so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import folders
from .folders import DEFAULT_MODEL_NAME, ModelLoadError, cache_dir, hub_offline

# Written last into a converted folder; bump the version to force a re-conversion.
COMPLETE_MARKER = ".sinq-export-complete"
CONVERSION_VERSION = "1"
GGUF_MAGIC = b"GGUF"
GGUF_SUFFIX = ".gguf"

# GGUF ``general.architecture`` -> the Hugging Face class transformers' GGUF loader builds for
# it: every family we export that the loader reads. (llama.cpp writes Mistral as ``llama``; the
# loader tells them apart by the model name, so both classes are accepted for it.)
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "llama": ("LlamaForCausalLM", "MistralForCausalLM"),
    "mistral": ("MistralForCausalLM",),
    "qwen2": ("Qwen2ForCausalLM",),
    "qwen3": ("Qwen3ForCausalLM",),
    "gemma3": ("Gemma3ForCausalLM",),
    "phi3": ("Phi3ForCausalLM",),
}
_TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.tokens")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GgufInfo:
    """What the header says, checked: enough to refuse a file before converting it."""

    path: Path
    architecture: str
    tensor_types: dict[str, int]  # GGML type name -> number of tensors, e.g. {"Q4_K": 120}
    file_type: int | None  # general.file_type (llama.cpp's LLAMA_FTYPE), when present
    has_chat_template: bool

    def to_dict(self) -> dict:
        return {
            "architecture": self.architecture,
            "tensor_types": dict(sorted(self.tensor_types.items())),
            "file_type": self.file_type,
            "has_chat_template": self.has_chat_template,
        }


# --------------------------------------------------------------------------- inspection


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """A dependency's exception text on one line (ours are one line by contract)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field_value(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{path}: GGUF file does not exist")
    return path


def inspect(path: str | os.PathLike) -> GgufInfo:
    """Check ``path`` is a complete GGUF we can convert; `ModelLoadError` (one line) otherwise."""
    from gguf import GGMLQuantizationType, GGUFReader

    path = _existing_file(path)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:  # maps every tensor's data: a short file (truncated download) fails here too
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors alike
        reason = f"{type(exc).__name__}: {_one_line(exc)}"
        raise ModelLoadError(f"{path}: damaged or truncated GGUF file ({reason})") from exc
    types = Counter(GGMLQuantizationType(int(t.tensor_type)).name for t in reader.tensors)
    if not types:
        raise ModelLoadError(f"{path}: GGUF holds no tensors")
    arch = _field_value(reader, "general.architecture")
    supported = ", ".join(sorted(ARCHITECTURES))
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {supported}")
    missing = [k for k in _TOKENIZER_KEYS if reader.get_field(k) is None]
    if missing:
        raise ModelLoadError(
            f"{path}: GGUF has no tokenizer metadata ({', '.join(missing)} missing); "
            "re-create it with llama.cpp's convert_hf_to_gguf.py, which embeds the tokenizer"
        )
    file_type = _field_value(reader, "general.file_type")
    return GgufInfo(
        path=path.resolve(),
        architecture=arch,
        tensor_types=dict(types),
        file_type=None if file_type is None else int(file_type),
        has_chat_template=reader.get_field("tokenizer.chat_template") is not None,
    )


def find_in_folder(folder: Path) -> Path | None:
    """The one ``*.gguf`` of a folder that is not a HF folder (no config.json); None if none."""
    if (folder / "config.json").is_file():
        return None
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ModelLoadError(f"{folder}: holds several GGUF files ({names}); pass the one to use")
    return found[0] if found else None


def resolve_model_input(model: str | os.PathLike | None) -> Path | None:
    """A model argument as a HF folder: a GGUF file, or a folder holding one, is converted
    (once, cached); anything else is returned unchanged (``None``: the bundled default)."""
    if model is None:
        return None
    path = Path(model).expanduser()
    if path.is_dir():
        gguf_file = find_in_folder(path)
        return convert(gguf_file) if gguf_file else path
    if path.suffix.lower() == GGUF_SUFFIX or (path.is_file() and _starts_with_magic(path)):
        return convert(path)
    return path


def _is_bundled(path: Path) -> bool:
    """The bundled SmolLM2 GGUF passed by path is the default model (one cache folder for it,
    whichever environment's copy of the package is named)."""
    try:
        return path.resolve() == folders.find_bundled_gguf().resolve()
    except (ModelLoadError, OSError):
        return False


def _starts_with_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


# --------------------------------------------------------------------------- cache


def _source_identity(path: Path) -> dict:
    st = path.stat()
    return {"source": str(path.resolve()), "source_bytes": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def cache_name(path: Path) -> str:
    """Cache folder of a user GGUF: its stem plus a key of its absolute path, size and mtime, so
    a different or rewritten file never reuses another's folder (the marker re-checks it)."""
    ident = _source_identity(path)
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return f"gguf-{path.stem.lower()}-{key}"


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The conversion marker of a converted folder (None: not one of ours, or incomplete)."""
    try:
        marker = json.loads((Path(folder) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("version") == CONVERSION_VERSION else None


def _same_source(marker: dict | None, ident: dict, *, same_path: bool = False) -> bool:
    """A marker written for this very file: size, mtime where recorded, path if asked."""
    if marker is None or marker.get("source_bytes") != ident["source_bytes"]:
        return False
    if same_path and marker.get("source") != ident["source"]:
        return False
    return marker.get("source_mtime_ns", ident["source_mtime_ns"]) == ident["source_mtime_ns"]


def _is_current(folder: Path, gguf_path: Path) -> bool:
    """Complete, and converted from this very file."""
    return _same_source(read_marker(folder), _source_identity(gguf_path))


def _find_converted(root: Path, gguf_path: Path) -> Path | None:
    """A cache folder already converted from this file under another name (e.g. the bundled
    GGUF passed by path is the default model's folder)."""
    ident = _source_identity(gguf_path)
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and not folder.name.startswith(".") and _same_source(
            read_marker(folder), ident, same_path=True
        ):
            return folder
    return None


def source_quantization(folder: str | os.PathLike) -> dict | None:
    """For the export manifest: which GGUF quantization types a converted folder came from.

    ``{"format": "gguf", "file": ..., "architecture": ..., "tensor_types": {"Q4_K": n, ...},
    "file_type": ...}`` for a folder `convert` wrote, ``None`` for any other folder. Markers of
    folders converted before the types were recorded are completed from the source file's header,
    once: the answer is written back into the marker (parsing a GGUF's metadata takes seconds).
    """
    marker = read_marker(folder)
    if marker is None:
        return None
    info = marker.get("gguf")
    if info is None:
        with contextlib.suppress(ModelLoadError, OSError):
            info = inspect(marker["source"]).to_dict()
        if info is None:
            return None
        with contextlib.suppress(OSError):  # a read-only cache just keeps the old marker
            _write_marker(Path(folder), {**marker, "gguf": info})
    return {"format": "gguf", "file": marker.get("source"), **info}


def _write_marker(folder: Path, marker: dict) -> None:
    """Write (or replace) ``folder``'s conversion marker atomically: a temp file, then rename."""
    tmp = folder / f"{COMPLETE_MARKER}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(marker, indent=1) + "\n")
        os.replace(tmp, folder / COMPLETE_MARKER)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


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


def _apply_umask(folder: Path) -> None:
    """mkdtemp creates 0700 folders; give the finished folder the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def convert(path: str | os.PathLike, *, name: str | None = None) -> Path:
    """The cached HF folder of GGUF ``path``, converting it first if needed; returns the folder.

    ``name``: cache folder name (default `cache_name`); the bundled GGUF, however it is named
    (by path, or through the folder holding it), is the default model's folder. The file is
    checked (`inspect`) before anything is written; conversion goes into a temp folder inside
    the cache (same filesystem), the marker is written last, then the folder is renamed into
    place, so an aborted, failed or concurrent run never leaves a folder that looks complete.
    """
    path = _existing_file(path)
    root = cache_dir()
    if name is None and _is_bundled(path):
        name = DEFAULT_MODEL_NAME
        if read_marker(root / name) is not None:  # the default model: no re-check once converted
            return root / name
    final = root / (name or cache_name(path))
    if _is_current(final, path):
        return final
    if name is None and (found := _find_converted(root, path)):
        return found
    info = inspect(path)
    partial_prefix = f".{final.name}.partial-"
    lock = root / f".{final.name}.lock"
    try:
        with _exclusive_lock(lock):
            if _is_current(final, path):  # another process finished while we waited
                return final
            for stale in root.glob(f"{partial_prefix}*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=partial_prefix, dir=root))
            try:
                start = time.perf_counter()
                log.info("converting %s (%s, %.0f MB) once into %s ...", path.name,
                         "/".join(sorted(info.tensor_types)), path.stat().st_size / 1e6, final)
                _dequantise_to_folder(info, tmp)
                marker = {
                    "version": CONVERSION_VERSION,
                    **_source_identity(path),
                    "gguf": info.to_dict(),
                    "seconds": round(time.perf_counter() - start, 1),
                }
                _write_marker(tmp, marker)
                _apply_umask(tmp)
                if final.exists():  # stale or outdated folder: move aside, then delete
                    stale = Path(tempfile.mkdtemp(prefix=partial_prefix, dir=root))
                    os.replace(final, stale / "old")
                    shutil.rmtree(stale, ignore_errors=True)
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if not final.exists():  # failed first conversion: leave nothing behind in the cache
            lock.unlink(missing_ok=True)
    return final


@contextlib.contextmanager
def _gguf_bar_follows_transformers() -> Iterator[None]:
    """transformers' GGUF loader draws its dequantisation bar with plain ``tqdm``, ignoring
    transformers' own progress-bar switch (``disable_progress_bar``, which the CLI uses when
    quiet); for the duration of a load it gets transformers' switch-aware ``tqdm`` instead."""
    from transformers import modeling_gguf_pytorch_utils as loader
    from transformers.utils import logging as hf_logging

    plain = loader.tqdm
    loader.tqdm = hf_logging.tqdm
    try:
        yield
    finally:
        loader.tqdm = plain


def _dequantise_to_folder(info: GgufInfo, out_dir: Path) -> None:
    """transformers' GGUF loader -> a plain fp32 safetensors HF folder (weights, config,
    tokenizer with its chat template, generation config) in ``out_dir``.

    The loaded model carries a GGUF quantizer and ``quantization_config`` that make
    ``save_pretrained`` refuse; the weights are already dequantised floats, so both are dropped
    and the same model is saved (no second copy of the weights in memory).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    kwargs = {"gguf_file": info.path.name, "local_files_only": True}
    try:
        with hub_offline(), _gguf_bar_follows_transformers():
            tokenizer = AutoTokenizer.from_pretrained(info.path.parent, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(info.path.parent, dtype=torch.float32, **kwargs)
    except Exception as exc:  # the GGUF loader's errors have no common base
        raise ModelLoadError(f"{info.path}: transformers cannot load this GGUF ({_one_line(exc)})") from exc
    expected = ARCHITECTURES[info.architecture]
    if type(model).__name__ not in expected:
        raise ModelLoadError(f"{info.path}: loaded as {type(model).__name__}, expected "
                             f"{' or '.join(expected)}")
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    _check_tied_head(model)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    try:
        gen = GenerationConfig.from_model_config(model.config)
    except Exception:  # generation config is a convenience only
        gen = GenerationConfig()
    gen.save_pretrained(out_dir)


def _check_tied_head(model) -> None:
    """With tied embeddings lm_head must *be* the embedding matrix, else logits are wrong."""
    import torch

    if not getattr(model.config, "tie_word_embeddings", False):
        return
    head = model.get_output_embeddings().weight
    emb = model.get_input_embeddings().weight
    if head.data_ptr() != emb.data_ptr() and not torch.equal(head, emb):
        raise ModelLoadError(f"{model.config.name_or_path}: converted lm_head is not tied to the embeddings")
