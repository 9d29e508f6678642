"""Labelled examples for sequence classification: read, check, split, tokenize, pad.

**File**: JSONL, one object a line, ``{"text": str, "label": str | int}`` or
``{"input_ids": [int, …], "label": …}`` (for models without a tokenizer).
Labels are all strings or all integers (never mixed, never booleans). The
classes are the sorted distinct labels of the *training* examples; class
``k`` is the ``k``-th of them, so the same data always gives the same ids.

**Split** (no separate eval file): stratified and seeded. Class ``c`` with
``n_c`` examples puts ``round(n_c · eval_fraction)`` of them in the held-out
set, at most ``n_c − 1`` (a class never leaves training), chosen by a
permutation drawn from a generator seeded with ``seed``. With a separate eval
file, every eval label must be a training class.

**Padding**: a batch of ``b`` sequences is right-padded to its longest one,
``L``: ``input_ids (b, L)`` filled with the pad id, ``attention_mask (b, L)``
1 on real tokens. Right padding is what encoders expect, and decoders'
sequence-classification heads read the last non-pad token of each row.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from .data import index_batches, jsonl_objects, read_text


@dataclass(frozen=True, eq=False)
class Examples:
    """Token ids per example and integer labels ``(N,)``."""

    ids: list[list[int]]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: list[int]) -> "Examples":
        return Examples([self.ids[i] for i in index], self.labels[index] if index else self.labels[:0])


@dataclass(frozen=True, eq=False)
class LabelledData:
    """Train and held-out examples, the class names (``classes[k]`` is label id ``k``) and the source."""

    train: Examples
    eval: Examples
    classes: list
    source: str
    truncated: int = 0


def read_labelled(path: str | Path) -> tuple[list[str | list[int]], list]:
    """``(inputs, labels)``: texts or token-id lists, and raw labels, one per non-empty line."""
    path = Path(path)
    if not path.name.endswith((".jsonl", ".jsonl.gz")):
        raise ConfigError(f"{path}: --task classify reads JSONL ({{'text', 'label'}} per line); "
                          "name the file *.jsonl or *.jsonl.gz.")
    inputs, labels = [], []
    for i, obj in jsonl_objects(read_text(path, "a .jsonl (or .jsonl.gz) file with 'text' and 'label'"), path):
        if not isinstance(obj, dict) or "label" not in obj:
            raise ConfigError(f"{path}: line {i} has no 'label'; expected {{\"text\": ..., \"label\": ...}} "
                              "on every line.")
        label = obj["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise ConfigError(f"{path}: line {i}: 'label' is {json.dumps(label)}; expected a string or an integer.")
        if isinstance(obj.get("text"), str):
            inputs.append(obj["text"])
        elif isinstance(obj.get("input_ids"), list) and all(
                isinstance(x, int) and not isinstance(x, bool) for x in obj["input_ids"]) and obj["input_ids"]:
            inputs.append(obj["input_ids"])
        else:
            raise ConfigError(f"{path}: line {i} has neither 'text' (string) nor 'input_ids' (non-empty list of "
                              "ints).")
        labels.append(label)
    if not labels:
        raise ConfigError(f"{path}: holds no examples; expected JSONL with 'text' and 'label'.")
    kinds = {type(label).__name__ for label in labels}
    if len(kinds) > 1:
        first = {k: next(i for i, lab in enumerate(labels, 1) if type(lab).__name__ == k) for k in sorted(kinds)}
        raise ConfigError(f"{path}: labels mix types {first} (type: first example); expected all strings or all "
                          "integers. Quote the integer labels or convert the strings.")
    return inputs, labels


def class_list(labels: list, path: str | Path) -> list:
    """The sorted distinct labels; at least two."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ConfigError(f"{path}: every example has label {classes[0]!r}; classification needs at least two "
                          "classes.")
    return classes


def stratified_split(labels: torch.Tensor, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, eval)`` indices: per class ``min(n_c − 1, round(n_c · eval_fraction))`` held out (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    train, held = [], []
    for c in range(int(labels.max()) + 1):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)].tolist()
        k = min(len(idx) - 1, round(len(idx) * eval_fraction))
        held += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(held)


def tokenize_inputs(inputs: list, tokenizer, max_length: int, vocab_size: int, path) -> tuple[list[list[int]], int]:
    """Token ids (special tokens added by the tokenizer), each cut to ``max_length``; and how many were cut."""
    if tokenizer is None and any(isinstance(x, str) for x in inputs):
        raise ConfigError(f"{path}: holds text but the model folder has no tokenizer files (tokenizer.json, "
                          "vocab.txt …); copy them into the folder, or give 'input_ids' instead of 'text'.")
    out, cut = [], 0
    for x in inputs:
        ids = x if isinstance(x, list) else tokenizer(x, add_special_tokens=True)["input_ids"]
        if len(ids) > max_length:
            # Keep the tokenizer's final special token ([SEP], </s>) where it added one: encoders were trained so.
            tail = ids[-1:] if not isinstance(x, list) and ids[-1] in getattr(tokenizer, "all_special_ids", []) else []
            ids = ids[: max_length - len(tail)] + tail
            cut += 1
        out.append(list(ids))
    bad = sorted({t for ids in out for t in ids if not 0 <= t < vocab_size})
    if bad:
        raise ConfigError(f"{path}: token ids {bad[:5]} are outside the model's vocabulary [0, {vocab_size}).")
    return out, cut


def load_labelled(
    data: str | Path, *, tokenizer, max_length: int, vocab_size: int, eval_fraction: float, seed: int,
    eval_data: str | Path | None = None,
) -> LabelledData:
    """Read, check, split (or read the eval file) and tokenize; warn once when texts were truncated, and once
    when the held-out examples are none or miss classes (:func:`warn_thin_eval`)."""
    inputs, raw = read_labelled(data)
    if eval_data is None:
        classes = class_list(raw, data)
        ids = {c: k for k, c in enumerate(classes)}
        labels = torch.tensor([ids[x] for x in raw])
        tr, ev = stratified_split(labels, eval_fraction, seed)
        tr_inputs, ev_inputs = [inputs[i] for i in tr], [inputs[i] for i in ev]
        tr_labels, ev_labels = labels[tr], labels[ev] if ev else labels[:0]
    else:
        ev_raw_inputs, ev_raw = read_labelled(eval_data)
        classes = class_list(raw, data)
        if {type(x) for x in ev_raw} != {type(x) for x in raw}:
            raise ConfigError(f"{eval_data}: labels are {type(ev_raw[0]).__name__}s but {data} has "
                              f"{type(raw[0]).__name__}s; use the same label type in both files.")
        unseen = sorted(set(ev_raw) - set(classes))
        if unseen:
            line = next(i for i, x in enumerate(ev_raw, 1) if x == unseen[0])
            raise ConfigError(f"{eval_data}: label {unseen[0]!r} (first at example {line}) never occurs in the "
                              f"training file {data} (classes {classes[:8]}); drop those examples or add them to "
                              "training.")
        ids = {c: k for k, c in enumerate(classes)}
        tr_inputs, ev_inputs = inputs, ev_raw_inputs
        tr_labels = torch.tensor([ids[x] for x in raw])
        ev_labels = torch.tensor([ids[x] for x in ev_raw])
    tr_ids, cut_tr = tokenize_inputs(tr_inputs, tokenizer, max_length, vocab_size, data)
    ev_ids, cut_ev = tokenize_inputs(ev_inputs, tokenizer, max_length, vocab_size, eval_data or data)
    cut = cut_tr + cut_ev
    if cut:
        warnings.warn(f"{data}: {cut} of {len(tr_ids) + len(ev_ids)} examples are longer than {max_length} tokens "
                      "and were truncated (raise --max-length up to the model's positions to keep more).",
                      stacklevel=2)
    if eval_data is not None or eval_fraction > 0:
        warn_thin_eval(ev_labels, classes, eval_data or data, eval_data is None)
    source = str(data) if eval_data is None else f"{data} (eval: {eval_data})"
    return LabelledData(Examples(tr_ids, tr_labels), Examples(ev_ids, ev_labels), classes, source, cut)


def warn_thin_eval(labels: torch.Tensor, classes: list, path, split: bool) -> None:
    """One warning when the held-out examples are none, or miss classes (their F1 then counts 0 in macro-F1)."""
    fix = ("raise --eval-fraction or add examples (a class needs 2 or more to be held out), or give --eval-data"
           if split else "add examples of them")
    if len(labels) == 0:
        warnings.warn(f"{path}: the held-out split is empty (round(n_c · eval_fraction) is 0 for every class c, and "
                      f"each class keeps one training example); no eval loss or accuracy will be reported; {fix}.",
                      stacklevel=3)
        return
    missing = [classes[k] for k in range(len(classes)) if k not in set(labels.tolist())]
    if missing:
        warnings.warn(f"{path}: the held-out examples lack {len(missing)} of {len(classes)} classes "
                      f"({missing[:5]}{' …' if len(missing) > 5 else ''}); accuracy covers the others and macro-F1 "
                      f"counts the missing ones as 0; {fix}.", stacklevel=3)


def pad_batch(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: ``input_ids (b, L)`` and ``attention_mask (b, L)``."""
    L = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), L), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return input_ids, mask


#: Length bucketing draws each batch from a pool of this many batches' worth of shuffled examples.
BUCKET_POOL = 32


def bucketed_batches(lengths: list[int], batch_size: int, seed: int, pool: int = BUCKET_POOL):
    """Endless ``(epoch, indices)`` with little padding: each epoch a seeded permutation of the examples is cut
    into pools of ``pool · b``; inside a pool the examples are sorted by length and cut into batches of ``b``,
    and the pool's batches are yielded in a seeded random order. Every example still comes once an epoch, in
    random company of similar length (transformers' ``group_by_length`` does the same, with 50 batches a pool);
    a batch then pads to a length near its own examples', not to the longest of a random draw. A pool's rest
    (``len mod b`` examples) is dropped before the sort, so at random, as :func:`.data.index_batches` drops the
    epoch's (dropped after the sort, it would always be the pool's longest examples).
    """
    gen = torch.Generator().manual_seed(seed)
    n, b = len(lengths), min(batch_size, len(lengths))
    size = torch.tensor(lengths)
    epoch = 0
    while True:
        perm = torch.randperm(n, generator=gen)
        for lo in range(0, n, pool * b):
            chunk = perm[lo: lo + pool * b]
            chunk = chunk[: len(chunk) // b * b]  # the rest dropped before sorting: random ones, not the longest
            chunk = chunk[torch.sort(size[chunk], stable=True).indices]  # by length, ties in random order
            cut = [chunk[i: i + b] for i in range(0, len(chunk), b)]
            for j in torch.randperm(len(cut), generator=gen).tolist():
                yield epoch, cut[j]
        epoch += 1


def example_batches(examples: Examples, batch_size: int, seed: int, pad_id: int, bucket: bool = True):
    """Endless ``(epoch, batch dict)``: length-bucketed (:func:`bucketed_batches`), or with ``bucket=False``
    drawn like the LM task's blocks (:func:`.data.index_batches`)."""
    draw = bucketed_batches([len(x) for x in examples.ids], batch_size, seed) if bucket else \
        index_batches(len(examples), batch_size, seed)
    for epoch, idx in draw:
        yield epoch, collate(examples.subset(idx.tolist()), pad_id)


def collate(examples: Examples, pad_id: int) -> dict[str, torch.Tensor]:
    input_ids, mask = pad_batch(examples.ids, pad_id)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": examples.labels}
