"""``lora-lens train`` for every method, and bad input: exit 2, one line on stderr, no traceback."""

import json

import pytest
from click.testing import CliRunner

import lora_lens
from lora_lens_cli.main import main

from .cli_utils import assert_bad_input, assert_stamped
from .cli_utils import run as run_cli
from .train_utils import write_condlora_init, write_cora_init

pytestmark = pytest.mark.realmodel

FAST = ["--steps", "3", "--batch-size", "2", "--seq-len", "16"]


def run(*args):
    return run_cli("train", *args)


@pytest.mark.parametrize("method", ["lora", "cora-frozen", "cora-init", "condlora", "lora-sp", "chain"])
def test_each_method_json(stories_path, tmp_path, method):
    r = run("--base", stories_path, "--method", method, *FAST, "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    d = assert_stamped(json.loads(r.stdout), "train_result")
    assert_stamped(json.loads((tmp_path / "out" / "train_log.json").read_text()), "train_run")
    for key in ("losses", "eval_loss", "trainable_parameters", "allocated_parameters", "wall_time_s",
                "tokens_per_s", "method", "output"):
        assert key in d, key
    assert d["method"] == method and len(d["losses"]) == 3 and d["output"] == str(tmp_path / "out")
    if method == "lora-sp":
        assert d["trainable_parameters"] < d["allocated_parameters"]
    adapter = lora_lens.load_adapter(tmp_path / "out")
    assert len(adapter) == 10


def test_text_output_and_init_folders(stories_path, tmp_path):
    write_cora_init(tmp_path / "cora", stories_path, rank=4)
    r = run("--base", stories_path, "--method", "cora-frozen", "--init", tmp_path / "cora", *FAST,
            "-o", tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert "cora-frozen: 3 steps" in r.stdout and "trainable parameters 2,560" in r.stdout
    write_condlora_init(tmp_path / "cond", {"self_attn.q_proj": (64, 64), "self_attn.v_proj": (32, 64)})
    r = run("--base", stories_path, "--method", "condlora", "--init", tmp_path / "cond", *FAST, "-o", tmp_path / "b")
    assert r.exit_code == 0, r.output
    r = run("--base", stories_path, "--method", "chain", "--knots", "1,2", *FAST, "--sp-granularity", "element",
            "-o", tmp_path / "c")
    assert r.exit_code == 0 and "chain knots at steps [1, 2]" in r.stdout, r.output


def test_jsonl_token_ids(stories_path, tmp_path):
    data = tmp_path / "ids.jsonl"
    data.write_text("\n".join(json.dumps({"input_ids": list(range(i, i + 40))}) for i in range(0, 400, 40)))
    r = run("--base", stories_path, "--method", "lora", "--data", data, *FAST, "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "train_log.json").read_text())["provenance"]["data"] == str(data)


def test_unknown_method(stories_path, tmp_path):
    assert_bad_input(run("--base", stories_path, "--method", "dora", "-o", tmp_path / "o"), "'dora'", "lora-sp",
                     "lora-lens train --help")


def test_missing_base(tmp_path):
    assert_bad_input(run("--base", tmp_path / "nope", "--method", "lora", "-o", tmp_path / "o"), "nope")


def test_base_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    assert_bad_input(run("--base", tmp_path / "m", "--method", "lora", "-o", tmp_path / "o"), "config.json")


def test_init_of_the_wrong_method(stories_path, tmp_path):
    write_condlora_init(tmp_path / "cond", {"self_attn.q_proj": (64, 64)})
    assert_bad_input(
        run("--base", stories_path, "--method", "cora-frozen", "--init", tmp_path / "cond", "-o", tmp_path / "o"),
        "'condlora' init folder", "cora init",
    )
    assert_bad_input(run("--base", stories_path, "--method", "lora", "--init", tmp_path / "cond", "-o", tmp_path / "o"),
                     "takes no --init")
    assert_bad_input(run("--base", stories_path, "--method", "cora-init", "--init", tmp_path, "-o", tmp_path / "o"),
                     "lora_lens_init.json")


def test_text_data_without_tokenizer(stories_path, tmp_path):
    (tmp_path / "t.txt").write_text("once upon a time\n" * 50)
    assert_bad_input(run("--base", stories_path, "--method", "lora", "--data", tmp_path / "t.txt", "-o", tmp_path / "o"),
                     "no tokenizer", "input_ids")


def test_bad_options(stories_path, tmp_path):
    base = ["--base", stories_path, "-o", tmp_path / "o"]
    assert_bad_input(run(*base, "--method", "lora", "--knots", "5"), "options of --method chain")
    assert_bad_input(run(*base, "--method", "lora-sp", "--sp-resample", "daily"), "re-sample 'daily'")
    assert_bad_input(run(*base, "--method", "lora", "--targets", "c_attn"), "match no module")
    assert_bad_input(run(*base, "--method", "lora", "--steps", "0"), "steps=0")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("keep")
    assert_bad_input(run(*base, "--method", "lora"), "not empty", "--overwrite")


def test_help_has_examples():
    r = CliRunner().invoke(main, ["train", "--help"])
    assert r.exit_code == 0 and "Examples:" in r.output and "--sp-granularity" in r.output


def test_train_refuses_nan_base_truncated_base_and_encoders(tmp_path, stories_path, minilm_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from lora_lens_cli.main import main as cli_main
    from click.testing import CliRunner

    def run(*args):
        return CliRunner().invoke(cli_main, list(map(str, args)))

    bad = tmp_path / "nan"
    shutil.copytree(stories_path, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("inf")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    r = run("train", "--base", bad, "--method", "lora", "--steps", "2", "-o", tmp_path / "o1")
    assert r.exit_code == 2 and "q_proj" in r.stderr and "NaN/Inf" in r.stderr and not (tmp_path / "o1").exists()

    trunc = tmp_path / "trunc"
    shutil.copytree(stories_path, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    r = run("train", "--base", trunc, "--method", "lora", "--steps", "2", "-o", tmp_path / "o2")
    assert r.exit_code == 2 and "not a valid safetensors" in r.stderr

    r = run("train", "--base", minilm_path, "--method", "lora", "--steps", "2", "-o", tmp_path / "o3")
    assert r.exit_code == 2 and "encoder" in r.stderr


def test_train_divergence_is_an_error_not_nan_output(tmp_path, stories_path):
    from lora_lens_cli.main import main as cli_main
    from click.testing import CliRunner

    r = CliRunner().invoke(cli_main, ["train", "--base", str(stories_path), "--method", "lora", "--steps", "5",
                                      "--lr", "1e12", "--max-grad-norm", "0", "-o", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 2 and "diverged" in r.stderr and not (tmp_path / "o").exists()
