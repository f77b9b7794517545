"""Where the model comes from, what identifies it, and how a trained one is written out.

Three sources (``--model``, ``--model-factory``):

* a **preset** (``tiny`` ... ``llama-7b``, :mod:`mecefo.presets`): a transformers ``LlamaForCausalLM`` of
  the preset's shape, random initial weights from ``--seed``. With a corpus tokenised by
  ``--tokenizer`` its vocabulary is the tokenizer's (a preset is a shape; the vocabulary follows the data).
* a **Hugging Face model directory** (``config.json``, weights in ``*.safetensors`` if present): any
  ``AutoModelForCausalLM`` architecture. ``--init pretrained`` (the default when the directory holds
  weights) loads them: continued training or fine-tuning; ``--init random`` initialises from the
  config with ``--seed``: pre-training. Nothing is downloaded: a model id that is not a local
  directory is refused.
* a **factory** ``module:function``: a callable returning an ``nn.Module`` whose forward takes
  ``input_ids`` [batch, seq] and returns logits [batch, seq, vocab] (or an object with ``.logits``).

Every replica builds its initial model from the same source and seed, so replicas start identical
without communication. The master weights (and so AdamW's state) are float32, or float64 with
``--dtype float64``; ``--dtype bfloat16`` computes in bf16 under autocast (:mod:`mecefo.model`).

MeCeFO's neighbour mode needs decoder layers that ``mecefo_kernels.apply_mecefo`` accepts (LLaMA,
Mistral, Qwen2, Qwen3, ...); a model without them runs the exact policies only
(:func:`check_policy_supported`).

The model's **identity** (:func:`model_identity`: architecture, a hash of its config, a hash of its
initial weights or the seed that draws them) travels with the corpus fingerprint into what replicas
and groups check before they train together and heal from each other.

**Export** (:func:`export_model`): a directory ``from_pretrained`` loads (config + safetensors, the
tokenizer when one was given), written atomically. The trainer writes ``RUN_DIR/final`` at the end
of a run; ``python -m mecefo.export`` writes one from any checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, TrainConfig
from .presets import PRESETS, ModelPreset, get_preset

PRESET, DIRECTORY, FACTORY = "preset", "directory", "factory"
EXPORT_MARKER = "mecefo_export.json"  # in an exported directory: what it was exported from
WEIGHT_SUFFIX = ".safetensors"
# config keys that say where or with what a config was written, not what the model is
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model source (:func:`resolve_model_source`).

    ``name``: the preset's name, the directory's absolute path, or ``module:function``.
    ``init``: ``random`` or ``pretrained``. ``architecture``: the transformers class name (or the
    factory's). ``shape``: the LLaMA shape for the FLOP model (None for a factory).
    ``vocab_size`` / ``max_positions``: None when unknown (a factory).
    """

    kind: str
    name: str
    init: str
    architecture: str
    shape: ModelPreset | None
    vocab_size: int | None
    max_positions: int | None

    @property
    def label(self) -> str:
        """Short, for titles and logs."""
        if self.kind == PRESET:
            return self.name
        if self.kind == DIRECTORY:
            return f"{Path(self.name).name} ({self.architecture}, {self.init})"
        return f"{self.name} (factory)"


def _error(option: str, message: str) -> ConfigError:
    return ConfigError(option, message)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise _error("model", "a Hugging Face model directory needs transformers: pip install "
                              "'mecefo_kernels[train]'") from None
    return transformers


def _weight_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(WEIGHT_SUFFIX))


def _load_config(directory: Path, option: str = "--model"):
    transformers = _transformers()
    if not (directory / "config.json").is_file():
        raise _error("model", f"{option} {directory}: no config.json: not a Hugging Face model directory")
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        raise _error("model", f"{option} {directory}: cannot read its config.json: {str(e).splitlines()[0]}") from None
    mapping = transformers.AutoModelForCausalLM._model_mapping
    if type(config) not in mapping:
        raise _error("model", f"{option} {directory}: model_type {config.model_type!r} has no causal-LM class in "
                              f"transformers {transformers.__version__} (AutoModelForCausalLM cannot build it)")
    return config, mapping[type(config)].__name__


def _shape_of(config) -> ModelPreset | None:
    """The LLaMA-style shape of a transformers config, for the FLOP model; None if it lacks the fields."""
    try:
        heads = config.num_attention_heads
        return ModelPreset(name=config.model_type, hidden_size=config.hidden_size,
                           intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
                           num_heads=heads, vocab_size=config.vocab_size,
                           max_seq_len=getattr(config, "max_position_embeddings", None) or 0,
                           num_kv_heads=getattr(config, "num_key_value_heads", None) or heads)
    except AttributeError:
        return None


def _is_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and " " not in text


def resolve_model_source(cfg: TrainConfig, *, corpus_vocab: int | None = None,
                         tokenised: bool = False) -> ModelSource:
    """The model ``cfg`` asks for, checked without building it; :class:`~mecefo.config.ConfigError` on bad input.

    ``corpus_vocab`` / ``tokenised``: the prepared corpus's vocabulary and whether a tokenizer made it
    (a preset then takes the tokenizer's vocabulary).
    """
    if cfg.model_factory is not None:
        factory = load_factory(cfg.model_factory)
        name = f"{factory.__module__}:{factory.__qualname__}"
        return ModelSource(FACTORY, cfg.model_factory, "random", name, None, None, None)
    model = cfg.model_name
    if model in PRESETS:
        if cfg.init == "pretrained":
            raise _error("init", f"--init pretrained: preset {model!r} has no weights; pass a model directory "
                                 "with --model, or --init random")
        preset = get_preset(model)
        vocab = corpus_vocab if tokenised and corpus_vocab else preset.vocab_size
        return ModelSource(PRESET, model, "random", "LlamaForCausalLM", preset, vocab, preset.max_seq_len)
    path = Path(model).expanduser()
    if not path.exists():
        if _is_hub_id(model):
            raise _error("model", f"--model {model!r} is not a local directory, and nothing is downloaded at run "
                                  f"time: download it first (e.g. `hf download {model} --local-dir DIR`) and pass "
                                  "--model DIR")
        raise _error("model", f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
                              "model directory")
    if not path.is_dir():
        raise _error("model", f"--model {model}: not a directory (a Hugging Face model directory holds config.json "
                              "and *.safetensors)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise _error("model", f"--model {model}: directory not readable")
    config, architecture = _load_config(path)
    weights = _weight_files(path)
    init = cfg.init or ("pretrained" if weights else "random")
    if init == "pretrained" and not weights:
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (f" (it has {', '.join(others)}: convert to safetensors, e.g. load and save_pretrained it once)"
                if others else "")
        raise _error("init", f"--init pretrained: {path} holds no *.safetensors weights{hint}; use --init random "
                             "to train this architecture from scratch")
    shape = _shape_of(config)
    return ModelSource(DIRECTORY, str(path.resolve()), init, architecture, shape, config.vocab_size,
                       getattr(config, "max_position_embeddings", None))


def load_factory(spec: str):
    """The callable named by ``module:function`` (the module importable from the current directory or
    PYTHONPATH, as the replicas, started in the same directory, will import it)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise _error("model_factory", f"--model-factory {spec!r}: expected MODULE:FUNCTION, e.g. mymodels:build")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` gives the replicas
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001  (any import-time error of the user's module)
        raise _error("model_factory", f"--model-factory {spec!r}: cannot import {module_name}: "
                                      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    target = module
    for part in attr.split("."):
        target = getattr(target, part, None)
    if not callable(target):
        raise _error("model_factory", f"--model-factory {spec!r}: {module_name} has no callable {attr!r}")
    return target


def master_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype of the weights and the optimizer state: float64 for --dtype float64, else float32 (bf16 is
    compute only: mixed precision)."""
    return torch.float64 if cfg.dtype == "float64" else torch.float32


def build_model(cfg: TrainConfig, device: torch.device | str = "cpu", source: ModelSource | None = None) -> nn.Module:
    """The initial model of the job (every replica builds the same one): on the CPU first, then moved."""
    source = source or resolve_model_source(cfg)
    torch.manual_seed(cfg.seed)
    if source.kind == FACTORY:
        model = load_factory(source.name)()
        if not isinstance(model, nn.Module):
            raise TypeError(f"--model-factory {source.name} returned {type(model).__name__}, not a torch.nn.Module")
    elif source.kind == PRESET:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(source.shape.to_llama_config(vocab_size=source.vocab_size))
    else:
        transformers = _transformers()
        if source.init == "pretrained":
            model = transformers.AutoModelForCausalLM.from_pretrained(source.name, local_files_only=True,
                                                                      dtype=torch.float32)
        else:
            config, _ = _load_config(Path(source.name))
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(device=device, dtype=master_dtype(cfg))


def meta_model(cfg: TrainConfig, source: ModelSource) -> nn.Module:
    """The model's structure without memory (on the meta device), to check it before anything trains."""
    if source.kind == FACTORY:
        factory = load_factory(source.name)
        try:
            with torch.device("meta"):
                model = factory()
        except Exception:  # noqa: BLE001  (a factory that insists on real tensors: build it for real, once)
            torch.manual_seed(cfg.seed)
            model = factory()
        if not isinstance(model, nn.Module):
            raise _error("model_factory", f"--model-factory {source.name} returned {type(model).__name__}, not a "
                                          "torch.nn.Module")
        return model
    with torch.device("meta"):
        if source.kind == PRESET:
            from transformers import LlamaForCausalLM

            return LlamaForCausalLM(source.shape.to_llama_config(vocab_size=source.vocab_size))
        config, _ = _load_config(Path(source.name))
        return _transformers().AutoModelForCausalLM.from_config(config)


def check_policy_supported(cfg: TrainConfig, source: ModelSource) -> None:
    """ConfigError unless every decoder layer of the model is one MeCeFO's neighbour mode reproduces, when the
    policy may approximate (exact policies train any causal LM)."""
    if not cfg.resolved_policy.may_approximate:
        return
    from mecefo_kernels.hf import decoder_layers
    from mecefo_kernels.nn.decoder import check_decoder_layer

    model = meta_model(cfg, source)
    layers = decoder_layers(model)
    exact = "use an exact policy (--policy spread, ndb-exact, shrink or restart)"
    if not layers:
        raise _error("policy", f"--policy {cfg.policy}: {source.architecture} has no decoder layers (submodules "
                               f"with self_attn and mlp) for MeCeFO's neighbour mode; {exact}")
    for name, layer in layers:
        try:
            check_decoder_layer(layer, name)
        except ValueError as e:
            raise _error("policy", f"--policy {cfg.policy}: {source.architecture} cannot run MeCeFO's neighbour "
                                   f"mode: {e}; {exact}") from None


def model_vocab(model: nn.Module) -> int | None:
    """The model's vocabulary size (its config's, or its output embedding's rows), None if unknown."""
    config = getattr(model, "config", None)
    if getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return int(out.weight.shape[0]) if isinstance(out, nn.Linear) else None


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def _cached_file_hash(paths: list[Path], cache_dir: Path | None) -> str:
    """sha256 of the files, remembered under ``cache_dir`` by (path, size, mtime) so a 14 GB checkpoint is hashed
    once per machine, not at every start."""
    stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths)
    key = hashlib.sha256(stamp.encode()).hexdigest()[:24]
    memo = cache_dir / "model-hashes" / f"{key}.txt" if cache_dir else None
    if memo is not None and memo.is_file():
        return memo.read_text().strip()
    value = _sha256_files(paths)
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(value)
        os.replace(tmp, memo)
    return value


def _config_hash(source: ModelSource) -> str:
    if source.kind == PRESET:
        data = {**source.shape.as_dict(), "vocab_size": source.vocab_size}
    elif source.kind == DIRECTORY:
        config, _ = _load_config(Path(source.name))
        data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    else:
        module = sys.modules[source.architecture.split(":")[0]]
        path = getattr(module, "__file__", None)
        data = {"factory": source.architecture, "source": _sha256_files([Path(path)]) if path else None}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(cfg: TrainConfig, source: ModelSource, cache_dir: str | Path | None = None) -> dict:
    """What replicas and groups of one job must agree on about the model: architecture, config hash (for a
    factory: its source file's), and the initial weights (the safetensors files' hash, or the seed that
    draws random ones)."""
    if source.kind == DIRECTORY and source.init == "pretrained":
        weights = _cached_file_hash(_weight_files(Path(source.name)), Path(cache_dir) if cache_dir else None)[:16]
    else:
        weights = f"random, seed {cfg.seed}"
    return {"architecture": source.architecture, "config": _config_hash(source), "weights": weights}


# ---- export --------------------------------------------------------------------------------------------------


def _clean_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu") for k, v in state.items()}


def export_model(state: dict[str, torch.Tensor], cfg: TrainConfig, out: str | Path, *,
                 source: ModelSource | None = None, step: int | None = None, lineage: str | None = None) -> Path:
    """Write ``state`` (a model state dict) as a model directory at ``out``, atomically.

    A transformers model (preset or directory): ``save_pretrained`` (config.json + safetensors), plus
    the tokenizer when ``cfg.tokenizer`` names one, so ``AutoModelForCausalLM.from_pretrained(out)``
    (and ``AutoTokenizer``) load it. A factory model: its state dict as ``model.safetensors``. Either
    way ``mecefo_export.json`` says what was exported (step, lineage, source). An existing ``out`` is
    replaced only if it is an earlier export (it holds ``mecefo_export.json``); anything else there is
    refused.
    """
    out = Path(out)
    source = source or resolve_model_source(cfg)
    if out.exists() and not (out / EXPORT_MARKER).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an earlier export (no {EXPORT_MARKER}): not overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = _clean_state(state)
    if source.kind == FACTORY:
        from safetensors.torch import save_file

        # (clones: safetensors refuses tensors that share memory, e.g. tied embeddings)
        save_file({k: v.clone().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
    else:
        model = meta_model(cfg, source)
        model.load_state_dict(state, assign=True, strict=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer = cfg.tokenizer
        if tokenizer:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer, local_files_only=True).save_pretrained(str(tmp))
    marker = {"step": step, "lineage": lineage, "source": source.kind, "model": source.name,
              "architecture": source.architecture, "init": source.init, "tokenizer": cfg.tokenizer,
              "loadable_with": "torch state dict (safetensors)" if source.kind == FACTORY
              else "transformers AutoModelForCausalLM.from_pretrained"}
    (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def check_model(cfg: TrainConfig, corpus) -> dict:
    """Everything about the model a run needs, checked before any replica starts (ConfigError naming the
    option otherwise): the source resolves, the policy can run on it, its vocabulary holds the corpus's
    tokens, its context holds ``seq_len``. Returns the model's identity (:func:`model_identity`)."""
    tokenised = corpus.tokenizer is not None
    source = resolve_model_source(cfg, corpus_vocab=corpus.vocab, tokenised=tokenised)
    check_policy_supported(cfg, source)
    vocab = source.vocab_size if source.kind != FACTORY else model_vocab(meta_model(cfg, source))
    if vocab is not None and corpus.vocab > vocab:
        what = f"the tokenizer's vocabulary ({corpus.vocab} tokens)" if tokenised else \
            f"the corpus's token ids (up to {corpus.vocab - 1})"
        option = "tokenizer" if tokenised else "data"
        raise _error(option, f"{what} exceeds the model's vocabulary ({vocab}, {source.label}): use a tokenizer "
                             "that matches the model, or a model with a larger vocabulary")
    if source.max_positions and cfg.seq_len > source.max_positions:
        raise _error("seq_len", f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
                                f"{source.max_positions} ({source.label})")
    from .data import default_cache_dir

    return model_identity(cfg, source, cfg.cache_dir or default_cache_dir())
