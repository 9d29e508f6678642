"""The model side of training: load a base, find its vocabulary, score next-token predictions.

A base is any ``nn.Module`` that maps token ids ``(b, T)`` to logits
``(b, T, V)`` (a tensor, a tuple whose first item is the logits, or an object
with ``.logits`` as Hugging Face returns), or a Hugging Face causal-LM folder,
loaded with ``AutoModelForCausalLM`` from local files only. transformers is
imported only here, inside functions: it is the optional ``hf`` extra.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError, NonFiniteError
from ..io import open_base
from ..io.files import missing
from ..io.jsonfile import read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer_config.json")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "training a Hugging Face model folder needs transformers: pip install lora-lens[hf]"
        ) from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_model(base: str | Path | nn.Module, tokenizer=None) -> tuple[nn.Module, object, str]:
    """``(model, tokenizer or None, description)``; a module is deep-copied, never modified.

    A folder is read as a Hugging Face causal LM in float32 (adapters train in
    the base's dtype), with its tokenizer when the folder has tokenizer files.
    """
    if isinstance(base, nn.Module):
        return copy.deepcopy(base), tokenizer, type(base).__name__
    path = Path(base)
    check_model_folder(path, "AutoModelForCausalLM")
    _refuse_encoder(path)
    tf = _transformers()
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **float32_kw(tf))
    except ValueError as e:
        raise ConfigError(
            f"{path}: cannot be loaded as a causal LM ({str(e).splitlines()[0][:160]}); the trainer trains "
            "causal language models (AutoModelForCausalLM)."
        ) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot load the model ({str(e).splitlines()[0][:200]}).") from None
    tokenizer = tokenizer if tokenizer is not None else folder_tokenizer(path)
    check_finite(model, path)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # no KV cache while training
    return model, tokenizer, str(path)


def check_model_folder(path: Path, loader: str) -> None:
    """Refuse a missing folder, one without config.json, or damaged weights, before transformers sees it."""
    if not path.exists():
        raise CheckpointError(f"{path}: {missing(path)}; expected --base to name a Hugging Face model folder.")
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise CheckpointError(
            f"{path}: not a Hugging Face model folder (no config.json); the trainer loads models with "
            f"{loader}. Pass the folder that holds config.json and the weights."
        )
    open_base(path)  # our own validation first: a truncated or corrupt file is named, not a library traceback


def check_finite(model: nn.Module, path: Path) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise NonFiniteError(f"{path}: weight '{name}' holds NaN/Inf; expected finite weights. The checkpoint is "
                                 "damaged: use an earlier one.")


def folder_tokenizer(path: Path):
    """The folder's own tokenizer (local files only), or None when it has no tokenizer files."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    return _transformers().AutoTokenizer.from_pretrained(path, local_files_only=True)


def float32_kw(tf) -> dict:
    """``from_pretrained``'s float32 keyword: ``dtype`` from transformers 4.56, ``torch_dtype`` before."""
    major, minor = (int(x) for x in tf.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}


#: Encoder-only families: AutoModelForCausalLM would give them a random LM head
#: and bidirectional attention, so a next-token loss would read the future.
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert", "deberta", "deberta-v2",
                 "mpnet", "camembert")


def _refuse_encoder(path: Path) -> None:
    cfg = read_json(path / "config.json", "a Hugging Face config")
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path / 'config.json'}: holds a JSON {type(cfg).__name__}; expected a Hugging Face config "
                          "(a JSON object).")
    if cfg.get("model_type") in ENCODER_TYPES and not cfg.get("is_decoder", False):
        raise ConfigError(
            f"{path}: is an encoder ({cfg.get('model_type')}); the trainer trains causal LMs, and an encoder loaded as "
            "one gets a random LM head and sees the future tokens. Train it on labelled data with --task classify, "
            "pass a causal LM folder, or an nn.Module (see lora_lens.demo.NextTokenEncoder) from Python."
        )


def vocab_size(model: nn.Module) -> int:
    """Size of the input vocabulary: the config's, else the input embedding's rows."""
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is None:
        raise ConfigError(
            f"cannot tell the vocabulary size of {type(model).__name__}: it has no config.vocab_size and no "
            "nn.Embedding; the trainer needs a model that maps token ids to logits."
        )
    return int(emb.num_embeddings)


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``(b, T, V)`` logits for token ids ``(b, T)``."""
    out = model(ids)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def lm_loss(model: nn.Module, block: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a block ``(b, T + 1)``: inputs ``[:, :-1]``, targets ``[:, 1:]``."""
    logits = logits_of(model, block[:, :-1])  # (b, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), block[:, 1:].reshape(-1))
