"""Training data: the synthetic task as documented, files, tokenizers, the held-out split, batches."""

import json
import shutil

import pytest
import torch

from lora_lens import CheckpointError, ConfigError
from lora_lens.train import train
from lora_lens.train.data import batches, file_blocks, index_batches, load_data, split, synthetic_blocks
from lora_lens.train.loop import learning_rate
from lora_lens.train.config import TrainConfig


def test_synthetic_task_is_cyclic_counting():
    x = synthetic_blocks(512, seq_len=20, n=64, seed=3)
    assert x.shape == (64, 21) and x.dtype == torch.long
    assert int(x.min()) >= 256 and int(x.max()) < 256 + 16  # o = V // 2, K = 16
    step = (x[:, 1:] - x[:, :-1]) % 16  # (n, T): the stride d of each row, constant along the row
    assert bool((step == step[:, :1]).all()) and set(step[:, 0].tolist()) == {1, 2}
    assert torch.equal(x, synthetic_blocks(512, seq_len=20, n=64, seed=3))
    assert not torch.equal(x, synthetic_blocks(512, seq_len=20, n=64, seed=4))
    small = synthetic_blocks(10, seq_len=8, n=8)  # K = min(16, V // 2) = 5 tokens 5 … 9
    assert int(small.min()) >= 5 and int(small.max()) <= 9
    with pytest.raises(ConfigError, match="at least 4"):
        synthetic_blocks(3, 8)


def test_split_and_batches():
    blocks = torch.arange(50).view(10, 5)
    train_part, held = split(blocks, 0.2, seed=0)
    assert train_part.shape == (8, 5) and held.shape == (2, 5)
    assert sorted(torch.cat([train_part, held])[:, 0].tolist()) == list(range(0, 50, 5))
    it = batches(train_part, 3, seed=0)
    got = [next(it) for _ in range(4)]
    assert [e for e, _ in got] == [0, 0, 1, 1]  # 8 blocks → 2 full batches of 3 per epoch
    assert all(b.shape == (3, 5) for _, b in got)
    assert split(blocks[:1], 0.2, 0)[1].shape[0] == 0


def test_jsonl_input_ids_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"input_ids": [1, 2, 3, 4, 5]}\n\n{"input_ids": [6, 7, 8, 9, 10, 11]}\n')
    b = file_blocks(f, seq_len=4, vocab_size=20)
    assert b.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    f.write_text('{"input_ids": [1, 2, 99]}\n')
    with pytest.raises(ConfigError, match=r"\[99\] are outside"):
        file_blocks(f, 1, 20)
    f.write_text('{"tokens": [1]}\n')
    with pytest.raises(ConfigError, match="line 1 has neither"):
        file_blocks(f, 1, 20)
    f.write_text('{"input_ids": [1, 2, 3]}\n')
    with pytest.raises(ConfigError, match="need at least 2"):
        file_blocks(f, 4, 20)
    with pytest.raises(CheckpointError, match="no such file"):
        file_blocks(tmp_path / "none.txt", 4, 20)


def test_gzipped_data_files_are_read_like_plain_ones(tmp_path):
    """--data for --task lm takes .jsonl.gz / .txt.gz as classify does (the shared Austen corpus is gzipped)."""
    import gzip

    plain = tmp_path / "d.jsonl"
    plain.write_text('{"input_ids": [1, 2, 3, 4, 5]}\n{"input_ids": [6, 7, 8, 9, 10, 11]}\n')
    packed = tmp_path / "d.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert torch.equal(file_blocks(packed, 4, 20), file_blocks(plain, 4, 20))
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(CheckpointError, match="bad.txt.gz: cannot be read"):
        file_blocks(bad, 4, 20)


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=10, lr=1.0, warmup_steps=2)
    lrs = [learning_rate(t, cfg) for t in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_text_with_the_folders_tokenizer(tiny_llama, tmp_path):
    """A model folder with tokenizer files: text data is tokenized with it (local files only)."""
    tokenizers = pytest.importorskip("tokenizers")
    import transformers

    _, folder = tiny_llama
    words = ["<unk>", "</s>"] + [f"w{i}" for i in range(40)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    model_dir = tmp_path / "model"
    shutil.copytree(folder, model_dir)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>").save_pretrained(
        model_dir)
    text = tmp_path / "t.txt"
    text.write_text("\n".join(" ".join(f"w{(i + j) % 40}" for j in range(12)) for i in range(30)))
    from lora_lens.train.models import load_model

    _, tokenizer, _ = load_model(model_dir)
    data = load_data(text, seq_len=8, vocab_size=64, tokenizer=tokenizer, eval_fraction=0.25)
    assert data.train.shape[1] == 9 and data.eval.shape[0] >= 1
    assert 1 in torch.cat([data.train, data.eval]).flatten().tolist()  # EOS between documents
    jl = tmp_path / "t.jsonl"
    jl.write_text("\n".join(json.dumps({"text": line}) for line in text.read_text().splitlines()))
    result = train(model_dir, "lora", data=jl, steps=3, batch_size=2, seq_len=8)
    assert len(result.losses) == 3 and result.eval_loss is not None


def test_defaults_per_task_and_explicit_values_win():
    from lora_lens.train.config import TASK_DEFAULTS

    for task, d in TASK_DEFAULTS.items():
        cfg = TrainConfig(task=task)
        assert (cfg.steps, cfg.lr, cfg.batch_size) == (d["steps"], d["lr"], d["batch_size"])
    assert TrainConfig(task="classify", lr=1e-4, steps=7).lr == 1e-4
    assert TrainConfig(task="classify", lr=1e-4, steps=7).batch_size == TASK_DEFAULTS["classify"]["batch_size"]


def test_a_run_whose_eval_loss_did_not_move_warns():
    from types import SimpleNamespace

    from lora_lens.train.api import warn_if_not_learned

    cfg = TrainConfig(task="classify", steps=150, lr=5e-3, batch_size=8)
    with pytest.warns(UserWarning, match=r"did not learn: eval loss 0\.6920 → 0\.6940 over 150 steps \(lr 0\.005, "
                                         r"batch 8\); try a lower --lr \(e\.g\. 0\.001\) with --batch-size 16"):
        warn_if_not_learned(SimpleNamespace(eval_loss_before=0.692, eval_loss=0.694), cfg)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_not_learned(SimpleNamespace(eval_loss_before=0.692, eval_loss=0.60), cfg)  # learned: silent
        warn_if_not_learned(SimpleNamespace(eval_loss_before=None, eval_loss=None), cfg)  # nothing held out


def test_length_buckets_cover_each_example_once_an_epoch_and_pad_less():
    from lora_lens.train.labelled import bucketed_batches

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 200, (1000,), generator=g).tolist()
    draw = bucketed_batches(lengths, 16, seed=3, pool=8)
    first = [next(draw) for _ in range(1000 // 16 + 1)]
    epoch0 = torch.cat([idx for e, idx in first if e == 0])
    assert len(epoch0) == len(set(epoch0.tolist())) >= 1000 - 8 * 16  # no repeats; only each pool's rest dropped
    assert {e for e, _ in first} == {0, 1} and all(len(idx) == 16 for _, idx in first)
    size = torch.tensor(lengths)
    padded = sum(int(size[idx].max()) * 16 for e, idx in first if e == 0)
    n0 = sum(1 for e, _ in first if e == 0)
    uniform = [idx for _, (_, idx) in zip(range(n0), index_batches(1000, 16, 3))]
    padded_uniform = sum(int(size[idx].max()) * 16 for idx in uniform)
    assert padded < 0.7 * padded_uniform  # tokens computed, real + padding
    again = bucketed_batches(lengths, 16, seed=3, pool=8)
    assert all(torch.equal(next(again)[1], idx) for _, idx in first)  # seeded: the same batches


def test_length_buckets_never_drop_the_same_longest_examples():
    """A pool that is not a multiple of the batch drops its rest at random, as index_batches does: cut after the
    sort, it dropped the pool's longest examples, so with 100 examples at batch 16 the 4 longest were never drawn."""
    from lora_lens.train.labelled import bucketed_batches

    draw = bucketed_batches(list(range(100)), 16, seed=0)
    seen = {i for _ in range(6 * 20) for i in next(draw)[1].tolist()}  # 20 epochs of 6 batches
    assert seen == set(range(100))


def test_no_eval_block_occurs_in_training():
    """The synthetic task has only 32 distinct sequences among its 1,024 blocks: the split holds out whole ones."""
    data = load_data(None, seq_len=20, vocab_size=512, eval_fraction=0.1, seed=0)
    assert len(torch.unique(torch.cat([data.train, data.eval]), dim=0)) == 32  # K = 16 starts × 2 strides
    train_rows = {tuple(r) for r in data.train.tolist()}
    assert data.eval.shape[0] > 0 and not any(tuple(r) in train_rows for r in data.eval.tolist())
    assert data.train.shape[0] + data.eval.shape[0] == 1024 and 60 <= data.eval.shape[0] <= 160  # about 10 %
    # a file with repeated blocks: duplicates stay on one side too
    blocks = torch.arange(5).repeat_interleave(4).view(20, 1).repeat(1, 3)  # 5 distinct rows, 4 copies each
    for seed in range(5):
        tr, ev = split(blocks, 0.25, seed)
        assert ev.shape[0] >= 4 and not {tuple(r) for r in ev.tolist()} & {tuple(r) for r in tr.tolist()}
    assert split(torch.ones(6, 3, dtype=torch.long), 0.5, 0)[1].shape[0] == 0  # one distinct block: nothing held out
