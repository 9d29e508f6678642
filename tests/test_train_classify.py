"""--task classify: data checks, the split, padding, the head PEFT reloads, metrics and parameter counts."""

import json
import math

import pytest
import torch

import lora_lens
from lora_lens import ConfigError
from lora_lens.train import train
from lora_lens.train.labelled import pad_batch, read_labelled, stratified_split

from .tolerances import gamma, logits_atol_float64, merged_weights_logits_atol
from .cli_utils import assert_bad_input, run

pytest.importorskip("transformers")

METHODS = ["lora", "cora-frozen", "cora-init", "condlora", "lora-sp", "chain", "head-only"]
FAST = dict(steps=4, batch_size=4, lr=1e-2, device="cpu")


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def id_data(tmp_path_factory):
    """48 token-id examples of lengths 3 … 14 (so batches pad), 3 classes decided by the first token."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(48):
        n = 3 + i % 12
        ids = torch.randint(3, 60, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "label": ["low", "mid", "high"][ids[0] % 3]})
    return write_jsonl(tmp_path_factory.mktemp("data") / "ids.jsonl", rows)


# ----------------------------------------------------------------------------------------------- data


def test_stratified_split_is_seeded_and_keeps_every_class():
    labels = torch.tensor([0] * 50 + [1] * 20 + [2] * 1)
    tr, ev = stratified_split(labels, 0.2, seed=3)
    assert sorted(tr + ev) == list(range(71)) and not set(tr) & set(ev)
    assert [int((labels[ev] == c).sum()) for c in range(3)] == [10, 4, 0]  # round(n_c · 0.2); a singleton stays
    assert (tr, ev) == stratified_split(labels, 0.2, seed=3)
    assert ev != stratified_split(labels, 0.2, seed=4)[1]


def test_pad_batch_right_pads_with_a_mask():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("rows, needle", [
    ([{"text": "a", "label": "x"}, {"text": "b"}], "line 2 has no 'label'"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": 1}], "labels mix types"),
    ([{"text": "a", "label": True}], "expected a string or an integer"),
    ([{"label": "x"}], "neither 'text'"),
])
def test_bad_labels(tmp_path, rows, needle):
    with pytest.raises(ConfigError, match=needle):
        read_labelled(write_jsonl(tmp_path / "d.jsonl", rows))


# ----------------------------------------------------------------------------------------------- PEFT parity


def _peft_classifier(base_folder, out, ids, mask):
    """Logits of AutoModelForSequenceClassification + PeftModel.from_pretrained (or the saved head for head-only)."""
    import transformers
    from safetensors.torch import load_file

    classes = json.loads((out / "classes.json").read_text())
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        base_folder, num_labels=classes["num_labels"], pad_token_id=classes["pad_token_id"], dtype=torch.float32)
    if (out / "head_model.safetensors").is_file():
        missing, unexpected = model.load_state_dict(load_file(out / "head_model.safetensors"), strict=False)
        assert not unexpected and all(not k.startswith(tuple(classes["head"])) for k in missing)
    else:
        import peft

        model = peft.PeftModel.from_pretrained(model, out / "peft" if (out / "peft").is_dir() else out)
    model = model.double().eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _atol(model, logits):
    """Two float64 evaluations of one network in different operation order (tests/tolerances.py): each
    transformer layer is ≈ 8 sequential products (q, k, v, scores, mixing, output, two MLP matrices), then the
    pooler and the head; inner dimensions at most the MLP width."""
    cfg = model.config
    return logits_atol_float64(logits, depth=8 * cfg.num_hidden_layers + 2, width=cfg.intermediate_size)


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_llama"])
@pytest.mark.parametrize("method", METHODS)
def test_peft_reloads_the_trainers_logits(request, fixture, method, id_data, tmp_path):
    pytest.importorskip("peft")
    _, folder = request.getfixturevalue(fixture)
    extra = {"links": 2} if method == "chain" else {}
    result = train(folder, method, task="classify", data=id_data, out=tmp_path / "out", **FAST, **extra)
    ids, mask = pad_batch([[5, 9, 11, 40, 3], [7, 8], [31, 32, 33]], json.loads(
        (tmp_path / "out" / "classes.json").read_text())["pad_token_id"])
    # Compared in float64 on the same stored (float32) tensors, so only the order of operations differs
    # (PEFT scales after B, we before): tests/tolerances.py's bound for that. The chain's links are merged
    # into W0 in float32 (one rounding per link per adapted matrix) while PEFT adds them unmerged, so it
    # also gets the merged-weights bound. CondLoRA's file holds A = Θ_A W0ᵀ, B = W0 Θ_B rounded to float32
    # after a length-n product (relative error ≤ γ_n per factor) where the trainer computes them live: ≤ 2γ_n
    # of the adapter's change to the logits, bounded here by the logits' own scale.
    with torch.no_grad():
        ours = result.model.double()(input_ids=ids, attention_mask=mask).logits
    theirs = _peft_classifier(folder, tmp_path / "out", ids, mask)
    tol = _atol(result.model, ours)
    if method == "chain":
        tol += merged_weights_logits_atol(ours, matrices=len(lora_lens.load_adapter(tmp_path / "out")), roundings=2)
    if method == "condlora":
        tol += 2 * gamma(result.model.config.hidden_size) * float(ours.abs().max())
    torch.testing.assert_close(theirs, ours, atol=tol, rtol=0)
    assert result.eval_metrics is not None and 0 <= result.eval_accuracy <= 1


def test_decoder_reads_the_last_real_token_whatever_the_padding(tiny_llama, id_data):
    """Padding is invisible: each row's logits in a padded batch equal its logits alone (pad = EOS here)."""
    result = train(tiny_llama[1], "lora", task="classify", data=id_data, **FAST)
    rows = [[5, 9, 11, 40, 3], [7, 8]]
    ids, mask = pad_batch(rows, result.model.config.pad_token_id)
    with torch.no_grad():
        batched = result.model.double()(input_ids=ids, attention_mask=mask).logits
        alone = torch.cat([result.model(input_ids=torch.tensor([r])).logits for r in rows])
    # float64 throughout; only the summation order (padded keys add exact zeros) differs.
    torch.testing.assert_close(batched, alone, atol=_atol(result.model, alone), rtol=0)


# ----------------------------------------------------------------------------------------------- counts


def test_trainable_counts_are_what_the_optimizer_updates(tiny_bert, id_data):
    _, folder = tiny_bert
    head = 32 * 3 + 3  # classifier (K=3, hidden 32) weight + bias
    lora = 2 * 2 * 4 * (32 + 32)  # 2 layers × (query, value) × r=4 × (n + m)
    only = train(folder, "head-only", task="classify", data=id_data, **FAST)
    assert only.trainable_parameters == only.allocated_parameters == head
    full = train(folder, "lora", rank=4, task="classify", data=id_data, **FAST)
    assert full.trainable_parameters == lora + head
    sp = train(folder, "lora-sp", rank=4, task="classify", data=id_data, **FAST)
    assert sp.allocated_parameters == lora + head and head < sp.trainable_parameters < lora + head
    frozen = train(folder, "cora-frozen", rank=4, task="classify", data=id_data, **FAST)
    assert frozen.trainable_parameters == 2 * 2 * 4 * 32 + head  # only A (r, n) trains; B is the frozen basis


def test_result_carries_curves_metrics_and_memory(tiny_bert, id_data):
    r = train(tiny_bert[1], "lora", task="classify", data=id_data, eval_every=2, **FAST)
    assert [s for s, _ in r.eval_curve] == [0, 2, 4] and r.eval_curve[-1][1] == r.eval_loss
    assert set(r.eval_metrics) == {"loss", "accuracy", "macro_f1"}
    assert 0 <= r.eval_macro_f1 <= 1 and r.peak_memory_bytes > 0 and r.time_per_step_s > 0
    assert r.curves()["eval_steps"] == [0, 2, 4]


def test_macro_f1_against_a_hand_count(tiny_bert, id_data):
    """The reported macro-F1 equals one computed by hand from the model's own predictions."""
    from lora_lens.train.api import prepare
    from lora_lens.train.config import TrainConfig
    from lora_lens.train.labelled import collate

    run = prepare(tiny_bert[1], TrainConfig(method="head-only", task="classify", device="cpu"), data=id_data)
    held = run.task.data.eval
    with torch.no_grad():
        run.model.eval()
        pred = run.task.logits(run.model, collate(held, run.task.head.pad_token_id)).argmax(-1)
    y = held.labels
    f1 = []
    for c in range(3):
        tp = int(((pred == c) & (y == c)).sum())
        fp, fn = int(((pred == c) & (y != c)).sum()), int(((pred != c) & (y == c)).sum())
        f1.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    metrics = run.task.evaluate(run.model, run.device, 4, run.autocast)
    assert math.isclose(metrics["macro_f1"], sum(f1) / 3, abs_tol=1e-12)
    assert math.isclose(metrics["accuracy"], float((pred == y).float().mean()), abs_tol=1e-12)


def test_bfloat16_keeps_float32_master_weights(tiny_bert, id_data):
    r32 = train(tiny_bert[1], "lora", task="classify", data=id_data, train_dtype="float32", **FAST)
    r16 = train(tiny_bert[1], "lora", task="classify", data=id_data, train_dtype="bfloat16", **FAST)
    assert all(p.dtype == torch.float32 for p in r16.model.parameters())
    assert r16.train_dtype == "bfloat16" and all(math.isfinite(x) for x in r16.losses)
    # bf16 keeps 8 mantissa bits: the losses differ from float32's, by about 2⁻⁸ relative per op, not more.
    assert r16.losses != r32.losses
    assert all(abs(a - b) < 0.05 * abs(b) for a, b in zip(r16.losses, r32.losses))


def test_bfloat16_autocast_computes_in_bf16_and_updates_float32(tiny_bert, id_data):
    """--dtype bfloat16 is autocast, not a cast of the model: an adapted layer's forward gives bf16 activations,
    while the weights the optimizer updates and its moments stay float32; float32 stays float32 throughout."""
    from lora_lens.train import TrainConfig, fit, prepare

    seen = {}
    for dt in ("float32", "bfloat16"):
        run = prepare(tiny_bert[1], TrainConfig(method="lora", task="classify", train_dtype=dt, **FAST), data=id_data)
        layer = next(iter(run.adapted.layers.values()))
        outputs = []
        layer.register_forward_hook(lambda module, args, out: outputs.append(out.dtype))
        fit(run)
        seen[dt] = set(outputs)
        assert {p.dtype for p in run.model.parameters()} == {torch.float32}
        moments = [v for s in run.optimizer.state.values() for k, v in s.items() if k.startswith("exp_avg")]
        assert moments and {v.dtype for v in moments} == {torch.float32}
    assert seen == {"float32": {torch.float32}, "bfloat16": {torch.bfloat16}}


@pytest.mark.realmodel
def test_minilm_text_with_its_tokenizer(minilm_path, tmp_path):
    """The real MiniLM, its own tokenizer, real text; PEFT reloads the output with the trainer's logits."""
    pytest.importorskip("peft")
    rows = [{"text": t, "label": lab} for t, lab in [
        ("the cat sat on the mat and purred", "animal"), ("a dog barked at the mailman all morning", "animal"),
        ("the horse ran across the green field", "animal"), ("a bird sang in the old oak tree", "animal"),
        ("bread and butter with a cup of tea", "food"), ("she baked an apple pie for dinner", "food"),
        ("fresh soup with carrots and onions", "food"), ("a plate of rice and beans", "food"),
    ] * 3]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.warns(UserWarning, match="truncated"):
        result = train(minilm_path, "lora", task="classify", data=data, max_length=6, out=tmp_path / "o",
                       eval_fraction=0.25, **FAST)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(minilm_path)
    enc = tok(["a cat and a dog", "apple pie"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = result.model.double()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    theirs = _peft_classifier(minilm_path, tmp_path / "o", enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(theirs, ours, atol=_atol(result.model, ours), rtol=0)  # as in the tests above
    adapter = lora_lens.load_adapter(tmp_path / "o")
    assert len(adapter) == 12 and "classifier" in adapter.settings.modules_to_save


# ----------------------------------------------------------------------------------------------- CLI


def cli(*args):
    return run("train", *args)


CLI_FAST = ["--steps", "2", "--batch-size", "4", "--device", "cpu"]


def test_cli_classify_json_and_truncation_warning(tiny_llama, id_data, tmp_path):
    r = cli("--base", tiny_llama[1], "--task", "classify", "--data", id_data, "--method", "lora", "--max-length", 5,
            *CLI_FAST, "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["task"] == "classify" and 0 <= d["eval_accuracy"] <= 1 and d["time_per_step_s"] > 0
    warning = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:") and "did not learn" not in ln]
    assert len(warning) == 1 and "longer than 5 tokens and were truncated" in warning[0]
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["modules_to_save"] == ["score"]


def test_cli_head_only_on_lm(tiny_llama, tmp_path):
    r = cli("--base", tiny_llama[1], "--method", "head-only", "--seq-len", 8, *CLI_FAST, "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    from safetensors import safe_open

    with safe_open(tmp_path / "o" / "head_model.safetensors", "pt") as f:
        assert list(f.keys()) == ["lm_head.weight"]


@pytest.mark.parametrize("case", ["no tokenizer", "no head", "one class", "unseen eval label", "mixed labels",
                                  "missing label", "no data"])
def test_cli_bad_input(case, tiny_bert, tiny_vit, id_data, tmp_path):
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "a b", "label": "x"}, {"text": "c", "label": "y"}])
    args = {
        "no tokenizer": (tiny_bert[1], text, [], ("no tokenizer files",)),
        "no head": (tiny_vit, id_data, [], ("cannot host a sequence-classification head",)),
        "one class": (tiny_bert[1], write_jsonl(tmp_path / "one.jsonl", [{"input_ids": [4], "label": 1}] * 4), [],
                      ("at least two classes",)),
        "unseen eval label": (tiny_bert[1], id_data, ["--eval-data", write_jsonl(
            tmp_path / "ev.jsonl", [{"input_ids": [4], "label": "low"}, {"input_ids": [5], "label": "huge"}])],
            ("'huge'", "never occurs in the training file")),
        "mixed labels": (tiny_bert[1], write_jsonl(tmp_path / "mix.jsonl", [
            {"input_ids": [4], "label": 1}, {"input_ids": [5], "label": "one"}]), [], ("labels mix types",)),
        "missing label": (tiny_bert[1], write_jsonl(tmp_path / "nolabel.jsonl", [
            {"input_ids": [4], "label": "a"}, {"input_ids": [5]}]), [], ("nolabel.jsonl", "line 2 has no 'label'")),
        "no data": (tiny_bert[1], None, [], ("needs --data",)),
    }[case]
    base, data, extra, needles = args
    data_args = ["--data", data] if data else []
    r = cli("--base", base, "--task", "classify", *data_args, *extra, "--method", "lora", *CLI_FAST,
            "-o", tmp_path / "out")
    assert_bad_input(r, *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("per_class, fraction, needle", [
    ([3, 3], "0.1", "the held-out split is empty"),  # round(3 · 0.1) = 0 for both classes
    ([20, 2], "0.1", "lack 1 of 2 classes (['b'])"),  # round(2 · 0.1) = 0: b is never held out
    ([3, 3], "0", None),  # no held-out data asked for: nothing to warn about
])
def test_cli_thin_eval_split_warns_once(tiny_bert, tmp_path, per_class, fraction, needle):
    rows = [{"input_ids": [4 + i, 5], "label": c} for c, n in zip("ab", per_class) for i in range(n)]
    r = cli("--base", tiny_bert[1], "--task", "classify", "--data", write_jsonl(tmp_path / "d.jsonl", rows),
            "--method", "head-only", "--eval-fraction", fraction, *CLI_FAST, "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    warning = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:") and "did not learn" not in ln]
    assert [needle in w for w in warning] == ([True] if needle else [])
    d = json.loads(r.stdout)
    assert (d["eval_accuracy"] is None) == (needle != "lack 1 of 2 classes (['b'])")


def test_cli_eval_fraction_out_of_range_names_itself(tiny_bert, id_data, tmp_path):
    line = assert_bad_input(cli("--base", tiny_bert[1], "--task", "classify", "--data", id_data, "--method", "lora",
                                "--eval-fraction", "1.5", *CLI_FAST, "-o", tmp_path / "o"), "eval_fraction=1.5", "< 1")
    assert "weight_decay" not in line and not (tmp_path / "o").exists()
