"""compare-methods: the claims judged from numbers, and one tiny end-to-end run through the CLI."""

import json

import pytest

from lora_lens.compare_methods.claims import (FAILS, HOLDS, INCONCLUSIVE, evaluate_claims, holm, holm_adjusted, judge,
                                              outcome_label, paired_interval)

from .cli_utils import assert_bad_input, assert_stamped, run


def test_paired_interval_matches_scipys_paired_t_test():
    from scipy.stats import ttest_rel

    a, b = [0.71, 0.69, 0.74, 0.70], [0.70, 0.70, 0.71, 0.66]
    mean, half = paired_interval([x - y for x, y in zip(a, b)])
    ci = ttest_rel(a, b).confidence_interval(0.95)
    assert mean - half == pytest.approx(ci.low, abs=1e-12) and mean + half == pytest.approx(ci.high, abs=1e-12)
    assert paired_interval([0.3]) == (0.3, None)


@pytest.mark.parametrize("kind, mean, half, expected", [
    ("matches", -0.005, 0.004, HOLDS),         # whole interval above −δ (δ = 0.01)
    ("matches", -0.05, 0.02, FAILS),           # whole interval below −δ
    ("matches", -0.01, 0.02, INCONCLUSIVE),    # straddles −δ
    ("beats", 0.02, 0.01, HOLDS),
    ("beats", -0.01, 0.005, FAILS),
    ("beats", 0.01, 0.02, INCONCLUSIVE),
    ("beats", 0.5, None, INCONCLUSIVE),        # one seed: no spread
    ("matches", 0.0, 0.0, INCONCLUSIVE),       # every seed tied: a zero-width interval measures no spread
    ("beats", 0.03, 0.0, INCONCLUSIVE),
    ("beats", 1e-17, 2e-17, INCONCLUSIVE),     # equal in exact arithmetic, one ulp apart: still a tie
    ("matches", 0.03, 3e-18, INCONCLUSIVE),
])
def test_judge(kind, mean, half, expected):
    assert judge(kind, mean, half, margin=0.01) == expected


def test_claims_words_come_from_the_numbers():
    per_seed = {"lora": {0: 0.80, 1: 0.82, 2: 0.81}, "condlora": {0: 0.806, 1: 0.824, 2: 0.811},
                "chain": {0: 0.70, 1: 0.71, 2: 0.69}, "head-only": {0: 0.5, 1: 0.52, 2: 0.49},
                "cora-init": {0: 0.80}}
    params = {"lora": 1200, "condlora": 100, "chain": 1200, "head-only": 0, "cora-init": 1200}
    v = {x.key: x for x in evaluate_claims(per_seed, params, metric="accuracy", higher_is_better=True, margin=0.01)}
    assert set(v) == {"condlora", "chain", "control", "cora-init"}  # claims whose methods did not run are absent
    assert v["condlora"].outcome == HOLDS and "1/12 of LoRA's (paper: 1/12)" in v["condlora"].words
    assert v["condlora"].parameter_part == "as stated" and outcome_label(v["condlora"]) == HOLDS
    assert v["condlora"].words.startswith("holds: condlora 81.4 % vs lora 81.0 %")
    assert v["chain"].outcome == FAILS and v["chain"].advantage == pytest.approx(-0.11)
    assert v["control"].outcome == HOLDS
    assert v["cora-init"].outcome == INCONCLUSIVE and "1 seed" in v["cora-init"].words
    # lm: lower loss is better, so a method with the lower loss has the positive advantage
    lm = evaluate_claims({"lora": {0: 2.0, 1: 2.1, 2: 2.05}, "chain": {0: 1.5, 1: 1.55, 2: 1.53}},
                         {"lora": 1, "chain": 1}, metric="eval_loss", higher_is_better=False, margin=0.02)
    assert lm[0].outcome == HOLDS and lm[0].advantage > 0


def test_parameter_part_is_judged():
    # CondLoRA at 1/6 of LoRA's parameters: the accuracy part holds, the paper's 1/12 does not
    per_seed = {"lora": {0: 0.80, 1: 0.82, 2: 0.81}, "condlora": {0: 0.806, 1: 0.824, 2: 0.811}}
    (v,) = evaluate_claims(per_seed, {"lora": 1200, "condlora": 200}, metric="accuracy", higher_is_better=True,
                           margin=0.01)
    assert v.outcome == HOLDS and v.parameter_part == "at 1/6 (paper: 1/12)"
    assert outcome_label(v) == "holds at 1/6 of LoRA's parameters (paper: 1/12)" and v.words.startswith(
        "holds at 1/6 of LoRA's parameters (paper: 1/12): condlora")


def test_too_few_seeds_and_ulp_ties_get_no_verdict():
    two = {"lora": {0: 0.5, 1: 0.52}, "head-only": {0: 0.2, 1: 0.21}}
    (v,) = evaluate_claims(two, {"lora": 1, "head-only": 0}, metric="accuracy", higher_is_better=True, margin=0.01)
    assert v.outcome == INCONCLUSIVE and "needs at least 3 paired seeds (got 2)" in v.words
    # 0.1 + 0.2 and 0.3 differ by one ulp: the same accuracy, so no spread, whatever the sign of the ulp
    ulp = {"lora": {0: 0.1 + 0.2, 1: 0.3, 2: 0.3}, "cora-init": {0: 0.3, 1: 0.1 + 0.2, 2: 0.3}}
    (v,) = evaluate_claims(ulp, {"lora": 1, "cora-init": 1}, metric="accuracy", higher_is_better=True, margin=0.01)
    assert v.outcome == INCONCLUSIVE and "same difference" in v.words


def test_holm_keeps_false_holds_rare_when_every_method_equals_lora():
    """Null tables (every method's accuracy = LoRA's + seed noise): without a correction some "beats" or
    "matches"-failure verdict fires in far more than 2.5 % of tables; Holm keeps any wrong verdict ≤ 2.5 %."""
    import numpy as np

    rng = np.random.default_rng(0)
    methods = ["lora", "cora-frozen", "cora-init", "condlora", "lora-sp", "chain"]
    params = dict.fromkeys(methods, 1)
    wrong_holm = wrong_raw = 0
    tables = 600
    for _ in range(tables):
        seed_effect = rng.normal(0, 0.02, 5)  # shared by all methods of a seed (same split, same head init)
        per_seed = {m: {s: 0.7 + seed_effect[s] + rng.normal(0, 0.01) for s in range(5)} for m in methods}
        verdicts = evaluate_claims(per_seed, params, metric="accuracy", higher_is_better=True, margin=0.0)
        wrong_holm += any(v.outcome != INCONCLUSIVE for v in verdicts)
        raw = [judge("beats", *paired_interval([per_seed[m][s] - per_seed["lora"][s] for s in range(5)]), 0.0)
               for m in methods[1:]]
        wrong_raw += any(o != INCONCLUSIVE for o in raw)
    assert wrong_raw / tables > 0.1  # 5 claims × 2 directions × 2.5 %: the problem the correction solves
    assert wrong_holm / tables <= 0.04  # ≤ 2.5 % in expectation; 600 tables leave ~1 pt of sampling error


def test_holm_step_down():
    # sorted 0.001 ≤ 0.05/4, 0.011 ≤ 0.05/3, 0.03 > 0.05/2: stops there
    assert holm([0.001, 0.03, 0.011, 0.5], level=0.05) == [True, False, True, False]
    assert holm_adjusted([0.001, 0.03, 0.011, 0.5]) == pytest.approx([0.004, 0.06, 0.033, 0.5])


def test_cli_end_to_end(tiny_bert, tmp_path):
    import torch

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(40):
        ids = torch.randint(3, 60, (3 + i % 7,), generator=g).tolist()
        rows.append(json.dumps({"input_ids": ids, "label": ids[0] % 2}))
    (tmp_path / "d.jsonl").write_text("\n".join(rows))
    r = run("compare-methods", "--base", tiny_bert[1], "--data", tmp_path / "d.jsonl",
            "--methods", "lora,condlora,head-only", "--seeds", "2", "--steps", "3",
            "--batch-size", "4", "--eval-fraction", "0.25", "--device", "cpu", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    res = assert_stamped(json.loads((out / "results.json").read_text()), "comparison")
    assert [s["method"] for s in res["summary"]] == ["lora", "condlora", "head-only"]
    assert len(res["runs"]) == 6 and {c["key"] for c in res["claims"]} == {"condlora", "control"}
    assert all(c["outcome"] in (HOLDS, FAILS, INCONCLUSIVE) for c in res["claims"])
    head = 32 * 2 + 2
    assert {s["method"]: s["trainable_parameters"] for s in res["summary"]}["head-only"] == head
    assert res["analyses"]["seed_phi"]["lora"]["pairs"] == 1 and res["analyses"]["condlora_conversion"]
    md = (out / "results.md").read_text()
    assert "| lora | " in md and "## Claims" in md and md in r.stdout
    assert "| eval accuracy (mean ± std) | eval loss | macro-F1 |" in md and "chain splits" not in md  # no chain run
    assert "batch 4, texts cut to 128 tokens, 25 % held out, seeds [0, 1], float32" in md  # the settings that matter
    for png in ("metric_vs_parameters.png", "loss_curves.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    assert (out / "runs" / "lora-seed1" / "adapter_config.json").is_file()
    log = json.loads((out / "runs" / "lora-seed1" / "train_log.json").read_text())
    assert log["output"] == str(out / "runs" / "lora-seed1") == res["runs"][1]["output"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_cli_refuses_unknown_method_before_training(tiny_bert, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"input_ids": [4], "label": 0}\n')
    r = run("compare-methods", "--base", tiny_bert[1], "--data", tmp_path / "d.jsonl", "--methods", "lora,dora",
            "-o", tmp_path / "out")
    assert_bad_input(r, "unknown ['dora']")
    assert not (tmp_path / "out").exists()


def test_progress_counts_every_step_and_warnings_come_first(tiny_bert, tmp_path):
    """A log (not a terminal) gets "run k of N" per run, and a warning such as truncation once, before the
    second run starts rather than at the end; the API's progress counts steps over the whole comparison."""
    import torch

    from lora_lens.compare_methods import compare_methods

    g = torch.Generator().manual_seed(1)
    rows = [json.dumps({"input_ids": torch.randint(3, 60, (12,), generator=g).tolist(), "label": i % 2})
            for i in range(24)]
    (tmp_path / "d.jsonl").write_text("\n".join(rows))
    r = run("compare-methods", "--base", tiny_bert[1], "--data", tmp_path / "d.jsonl", "--methods", "lora,head-only",
            "--seeds", "1", "--steps", "2", "--batch-size", "4", "--max-length", "6", "--eval-fraction", "0.25",
            "--no-analysis", "--device", "cpu", "-o", tmp_path / "cli")
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    warned = [i for i, ln in enumerate(lines) if ln.startswith("warning:") and "truncat" in ln]
    assert len(warned) == 1 and warned[0] < lines.index("run 2 of 2: head-only, seed 0, 2 steps …"), lines
    assert any(ln.startswith("note: 1 seed(s)") for ln in lines)
    calls = []
    compare_methods(tiny_bert[1], tmp_path / "d.jsonl", tmp_path / "api", methods=["lora", "head-only"], seeds=[0],
                    steps=3, batch_size=4, eval_fraction=0.25, analyze=False, device="cpu",
                    progress=lambda done, total, what: calls.append((done, total, what)))
    assert [c[0] for c in calls] == [1, 2, 3, 4, 5, 6] and {c[1] for c in calls} == {6}
    assert calls[0][2].startswith("run 1/2 lora seed 0 · loss ") and calls[-1][2].startswith("run 2/2 head-only")
