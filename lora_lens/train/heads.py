"""Heads: the part of a model a run trains in full, next to (or, for ``head-only``, instead of) the adapter.

**classify**: the folder is loaded with ``AutoModelForSequenceClassification``
and ``num_labels = K``, so pooling is what the model family does in
transformers (BERT: the pooler over ``[CLS]``; RoBERTa / DistilBERT: the first
token through their classification head; decoders such as Llama / GPT-2: the
last non-pad token of each row). The head is every module PEFT's SEQ_CLS task
saves in ``modules_to_save`` (``classifier`` / ``score``), plus any module
whose weights the folder lacks (a BERT saved without its pooler): everything
the load initialised at random must be saved, or a reload would redraw it.
The random init comes from the global generator, which ``prepare`` seeds.

**lm**: only ``head-only`` trains a head, the output embedding
(``get_output_embeddings``); with tied embeddings that is the input
embedding too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import CheckpointError, ConfigError
from .models import _transformers, check_finite, check_model_folder, float32_kw, folder_tokenizer

#: PEFT's default ``modules_to_save`` for SEQ_CLS (``peft.utils.constants``).
SEQ_CLS_HEADS = ("classifier", "score")


@dataclass(frozen=True)
class Head:
    """Module paths trained in full, and (classify) the pad id and number of classes the model was built with."""

    paths: tuple[str, ...]
    pad_token_id: int | None = None
    num_labels: int | None = None


def load_classifier(base, num_labels: int, tokenizer=None):
    """``(model, tokenizer or None, description, Head)`` for sequence classification with ``num_labels`` classes."""
    if isinstance(base, nn.Module):
        raise ConfigError(f"--task classify trains a Hugging Face model folder; got a {type(base).__name__} "
                          "module. Save it with save_pretrained and pass the folder.")
    path = Path(base)
    check_model_folder(path, "AutoModelForSequenceClassification")
    tf = _transformers()
    try:
        model, info = tf.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, local_files_only=True, output_loading_info=True,
            ignore_mismatched_sizes=True, **float32_kw(tf))
    except ValueError as e:
        raise ConfigError(
            f"{path}: cannot host a sequence-classification head ({str(e).splitlines()[0][:160]}); --task classify "
            "needs a model family that AutoModelForSequenceClassification knows (BERT, RoBERTa, Llama, GPT-2 …)."
        ) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot load the model ({str(e).splitlines()[0][:200]}).") from None
    check_finite(model, path)
    tokenizer = tokenizer if tokenizer is not None else folder_tokenizer(path)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    pad = _pad_id(model, tokenizer)
    model.config.pad_token_id = pad  # decoders find the last real token by it; it must be the id we pad with
    return model, tokenizer, str(path), Head(head_paths(model, info), pad, num_labels)


def _pad_id(model: nn.Module, tokenizer) -> int:
    """The tokenizer's pad id, else the config's, else (decoders) EOS, else 0."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), model.config.pad_token_id,
                      getattr(tokenizer, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if isinstance(candidate, int):
            return candidate
    return 0


def head_paths(model: nn.Module, info: dict) -> tuple[str, ...]:
    """SEQ_CLS heads present, plus the modules of weights the load initialised (missing or resized)."""
    modules = dict(model.named_modules())
    paths = [p for p in SEQ_CLS_HEADS if p in modules]
    for key in sorted(set(info.get("missing_keys", ())) | {k[0] if isinstance(k, tuple) else k
                                                           for k in info.get("mismatched_keys", ())}):
        owner = key.rpartition(".")[0]
        if owner and not any(owner == p or owner.startswith(p + ".") for p in paths):
            paths.append(owner)
    if not paths:
        raise ConfigError(f"{type(model).__name__}: found no classification head ({list(SEQ_CLS_HEADS)}); "
                          "the model family cannot be trained with --task classify.")
    return tuple(paths)


def lm_head(model: nn.Module) -> Head:
    """The output embedding of a causal LM (``head-only`` on ``--task lm``)."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is None:
        raise ConfigError(f"{type(model).__name__}: has no output embedding (get_output_embeddings); head-only "
                          "needs one on --task lm.")
    path = next(p for p, m in model.named_modules() if m is out)
    return Head((path,))

