"""Training data: token blocks from a text / JSONL file, or a built-in synthetic task.

Everything becomes a ``(N, T + 1)`` tensor of token ids (``T`` = ``seq_len``):
a model sees ``ids[:, :-1]`` and is scored on predicting ``ids[:, 1:]``.

**Files.** ``.jsonl``: one object per line with ``"input_ids"`` (a list of
ints) or ``"text"``; any other file is plain text (one document per line,
blank lines skipped). Either may be gzipped (``.jsonl.gz``, ``.txt.gz``), as
the shared data sets are. Text needs the model folder's tokenizer (loaded with
``AutoTokenizer``, local files only). The token streams of all documents are
concatenated (with the tokenizer's EOS between documents when it has one) and
cut into blocks of ``T + 1`` tokens; the incomplete tail is dropped.

**Synthetic task** (no ``--data``): counting in a cyclic alphabet. With ``V``
the vocabulary size, ``K = min(16, V // 2)`` tokens ``o … o + K − 1`` starting
at ``o = V // 2`` (the middle of the vocabulary, where BPE vocabularies keep
ordinary word pieces rather than byte or special tokens), sequence ``i`` is

    x_t = o + (a_i + d_i · t) mod K,   t = 0 … T,

with start ``a_i`` uniform in ``[0, K)`` and stride ``d_i`` uniform in
``{1, 2}``. After two tokens everything is determined: a model must learn the
alphabet, the successor map and read the stride from the context. A uniform
guess over the vocabulary scores ``ln V``; the pretrained stories260K starts
near 11 nats and LoRA (r=8, q/v) gets below 2 in 40 steps at lr 1e-2.
Seeded: the same ``seed`` gives the same sequences.

The held-out split is a seeded random ``eval_fraction`` of the blocks in which
identical blocks stay together (:func:`split`): no held-out block occurs in
training. On the synthetic task that holds out whole (start, stride)
sequences; their windows still overlap shifted training sequences of the
same cyclic alphabet, so the held-out loss measures whether the counting rule
was learned for unseen starts, not language beyond the alphabet.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..io.files import missing

SYNTHETIC_SEQUENCES = 1024


@dataclass(frozen=True, eq=False)
class TokenData:
    """Train and held-out blocks ``(N, T + 1)`` (int64) and where they came from."""

    train: torch.Tensor
    eval: torch.Tensor
    source: str

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1]) - 1


def synthetic_blocks(vocab_size: int, seq_len: int, n: int = SYNTHETIC_SEQUENCES, seed: int = 0) -> torch.Tensor:
    """The counting task above: ``(n, seq_len + 1)`` token ids."""
    if vocab_size < 4:
        raise ConfigError(f"the synthetic task needs a vocabulary of at least 4 tokens; the model has {vocab_size}.")
    K = min(16, vocab_size // 2)
    o = vocab_size // 2
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(0, K, (n, 1), generator=gen)  # (n, 1)
    d = torch.randint(1, 3, (n, 1), generator=gen)  # (n, 1)
    t = torch.arange(seq_len + 1)[None]  # (1, T + 1)
    return o + (a + d * t) % K  # (n, T + 1)


def jsonl_objects(text: str, path: Path):
    """``(line number, object)`` for every non-blank line of JSONL ``text``; a line that is not JSON is refused."""
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {i} is not JSON ({e.msg}); expected one object per line.") from None


def read_text(path: Path, expected: str) -> str:
    """The UTF-8 text of a data file, gunzipped when its name ends in ``.gz``."""
    if not path.is_file():
        what = "is a folder" if path.is_dir() else missing(path)  # a symlink loop is named as one
        raise CheckpointError(f"{path}: {what}; expected --data to name {expected}.")
    try:
        raw = path.read_bytes()
        if path.suffix.lower() == ".gz":
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise CheckpointError(f"{path}: cannot be read ({e}); expected {expected}.") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text; expected {expected}.") from None


def read_documents(path: Path) -> list[str | list[int]]:
    """Documents from a text or JSONL file: strings, or lists of token ids."""
    text = read_text(path, "a .txt or .jsonl file (or either gzipped)")
    if not path.name.lower().removesuffix(".gz").endswith(".jsonl"):
        return [line for line in text.splitlines() if line.strip()]
    docs: list[str | list[int]] = []
    for i, obj in jsonl_objects(text, path):
        if isinstance(obj, dict) and isinstance(obj.get("input_ids"), list):
            ids = obj["input_ids"]
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
                raise ConfigError(f"{path}: line {i}: 'input_ids' holds non-integers; expected a list of token ids.")
            docs.append(ids)
        elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
            docs.append(obj["text"])
        else:
            raise ConfigError(f"{path}: line {i} has neither 'input_ids' (list of ints) nor 'text' (string).")
    return docs


def tokenize(docs: list[str | list[int]], tokenizer, path: Path) -> list[list[int]]:
    """Token ids of every document; text needs a tokenizer."""
    if tokenizer is None and any(isinstance(d, str) for d in docs):
        raise ConfigError(
            f"{path}: holds text but the model has no tokenizer; give token ids instead "
            '(a .jsonl file with {"input_ids": [...]} per line) or use a model folder with tokenizer files.'
        )
    return [d if isinstance(d, list) else tokenizer(d, add_special_tokens=True)["input_ids"] for d in docs]


def file_blocks(path: Path, seq_len: int, vocab_size: int, tokenizer=None) -> torch.Tensor:
    """Concatenate the documents' tokens and cut ``(N, seq_len + 1)`` blocks."""
    seqs = tokenize(read_documents(path), tokenizer, path)
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    stream: list[int] = []
    for s in seqs:
        stream += s + ([eos] if eos is not None else [])
    bad = sorted({t for t in stream if not 0 <= t < vocab_size})
    if bad:
        raise ConfigError(f"{path}: token ids {bad[:5]} are outside the model's vocabulary [0, {vocab_size}).")
    n = len(stream) // (seq_len + 1)
    if n < 2:
        raise ConfigError(
            f"{path}: {len(stream)} tokens make {n} block(s) of {seq_len + 1}; need at least 2 "
            "(one to train, one to evaluate). Add data or lower --seq-len."
        )
    return torch.tensor(stream[: n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1)


def split(blocks: torch.Tensor, eval_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random held-out split ``(train, eval)`` in which no eval block occurs in training.

    Identical blocks form one group and go to one side: the synthetic task
    draws 1,024 blocks from only ``2K`` distinct (start, stride) sequences, so
    a split of blocks would test memorisation. Groups are taken in a seeded
    random order until about ``eval_fraction`` of the blocks are held out; at
    least one group is held out and one kept when there are two or more.
    """
    n = blocks.shape[0]
    n_eval = 0 if eval_fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * eval_fraction)))
    if n_eval == 0:
        return blocks, blocks[:0]
    distinct, group = torch.unique(blocks, dim=0, return_inverse=True)  # group (n,): each block's distinct row
    n_groups = distinct.shape[0]
    if n_groups < 2:
        return blocks, blocks[:0]
    order = torch.randperm(n_groups, generator=torch.Generator().manual_seed(seed))
    held_so_far = torch.bincount(group, minlength=n_groups)[order].cumsum(0)  # blocks held out after k + 1 groups
    k = min(n_groups - 1, int((held_so_far < n_eval).sum()) + 1)
    held = torch.isin(group, order[:k])
    return blocks[~held], blocks[held]


def load_data(
    data: str | Path | None, seq_len: int, vocab_size: int, tokenizer=None, eval_fraction: float = 0.1, seed: int = 0
) -> TokenData:
    if data is None:
        blocks, source = synthetic_blocks(vocab_size, seq_len, seed=seed), "synthetic:cyclic-counting"
    else:
        blocks, source = file_blocks(Path(data), seq_len, vocab_size, tokenizer), str(data)
    train, held = split(blocks, eval_fraction, seed)
    return TokenData(train, held, source)


def index_batches(n: int, batch_size: int, seed: int):
    """Endless ``(epoch, indices)``: a new seeded permutation of ``range(n)`` each epoch, cut into batches of
    ``min(batch_size, n)``; the last short batch is dropped. Both tasks draw their batches here."""
    gen = torch.Generator().manual_seed(seed)
    b = min(batch_size, n)
    epoch = 0
    while True:
        perm = torch.randperm(n, generator=gen)
        for lo in range(0, n - b + 1, b):
            yield epoch, perm[lo: lo + b]
        epoch += 1


def batches(blocks: torch.Tensor, batch_size: int, seed: int):
    """Endless ``(epoch, batch (b, T + 1))`` of blocks (see :func:`index_batches`).

    When there are fewer blocks than ``batch_size`` every batch is the whole set.
    """
    for epoch, idx in index_batches(blocks.shape[0], batch_size, seed):
        yield epoch, blocks[idx]
