"""What the trainer writes: PEFT itself loads it onto the base and gives the trainer's logits."""

import json

import pytest
import torch
from torch import nn

import lora_lens
from lora_lens import ConfigError
from lora_lens.io import read_init_description
from lora_lens.train import train

from .tolerances import gamma, logits_atol_float64, merged_weights_logits_atol
from .train_utils import FAST, load_hf, logits, peft_logits, token_ids

pytest.importorskip("peft")

METHODS = ["lora", "cora-frozen", "cora-init", "condlora", "lora-sp", "chain"]


@pytest.fixture(scope="module")
def trained(stories_path, tmp_path_factory):
    """Every method trained once on stories260K (chain with 3 links), written to disk."""
    root = tmp_path_factory.mktemp("trained")
    out = {}
    for m in METHODS:
        extra = {"knots": (2, 4)} if m == "chain" else {}
        out[m] = train(stories_path, m, out=root / m, device="cpu", **FAST, **extra)
    return out


def assert_peft_matches_trainer(result, base_folder, adapter_folder, method, ids):
    """PEFT on the written adapter gives the trainer's logits, compared in float64 on the same stored values.

    In float64 the order of operations no longer matters (``logits_atol_float64``, ≈ 1e-12), so what is left
    is what float32 *storage* does, derived per method in tests/tolerances.py:
    - chain: the trainer holds the links merged into W0 in float32, one rounding per link and matrix, while
      PEFT adds the same links unmerged (``merged_weights_logits_atol``);
    - condlora: the trainer computes A = Θ_A W0ᵀ, B = W0 Θ_B live, the file holds them rounded to float32
      after a length-n product: a relative error ≤ γ_n on each factor, so ≤ 2γ_n of the change the adapter
      makes to the logits.
    """
    cfg = load_hf(base_folder).config
    layers, width = cfg.num_hidden_layers, getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
    ours = logits(result.model, ids, torch.float64)
    theirs = peft_logits(base_folder, adapter_folder, ids, torch.float64)
    base = logits(load_hf(base_folder), ids, torch.float64)
    change = (ours - base).abs().max().item()
    atol = logits_atol_float64(ours, depth=6 * layers + 1, width=width)  # q·k, ·v, o, gate/up, down per layer, head
    if method == "chain":
        atol += merged_weights_logits_atol(ours, matrices=len(lora_lens.load_adapter(adapter_folder)),
                                           roundings=len(result.knots) + 1)
    if method == "condlora":
        atol += 2 * gamma(cfg.hidden_size) * change
    torch.testing.assert_close(theirs, ours, atol=atol, rtol=0)
    # The adapter really changed the model, by far more than the tolerance (not a trivially empty update).
    assert change > 100 * atol


@pytest.mark.realmodel
@pytest.mark.parametrize("method", METHODS)
def test_peft_loads_output_with_the_trainers_logits(stories_path, trained, method):
    result = trained[method]
    folder = result.output / "peft" if method == "condlora" else result.output
    assert_peft_matches_trainer(result, stories_path, folder, method, token_ids(512, seed=1))


@pytest.mark.realmodel
@pytest.mark.parametrize("method", METHODS)
def test_output_reads_back_with_load_adapter(trained, method):
    result = trained[method]
    adapter = lora_lens.load_adapter(result.output)
    assert len(adapter) == 10
    assert adapter.names[0] == "model.layers.0.self_attn.q_proj"
    if method == "chain":
        # Three links of rank 8 concatenated along the rank, scaling folded in.
        assert {m.rank for m in adapter} == {24} and {m.scaling for m in adapter} == {1.0}
    else:  # CoRA's and CondLoRA's default scaling is 1, their inits' (train.setup.default_alpha); LoRA's 16/8 = 2
        scaling = 1.0 if method in ("cora-frozen", "cora-init", "condlora") else 2.0
        assert {m.rank for m in adapter} == {8} and {m.scaling for m in adapter} == {scaling}
    log = json.loads((result.output / "train_log.json").read_text())
    assert log["losses"] == result.losses and log["method"] == method
    assert log["trainable_parameters"] == result.trainable_parameters
    assert log["curves"]["train_loss"] == result.losses and log["curves"]["knots"] == list(result.knots)
    assert log["curves"]["eval_loss"] == [result.eval_loss_before, result.eval_loss]


@pytest.mark.realmodel
def test_condlora_output_is_an_init_folder(stories_path, trained, tmp_path):
    """OUT holds Θ + lora_lens_init.json; a new run started from it reproduces the trained model."""
    result = trained["condlora"]
    desc = read_init_description(result.output)
    assert desc.method == "condlora" and desc.peft_adapter == "peft"
    # per module type (methods.condlora.condlora_modes): q_proj 64×64 official, v_proj 32×64 general
    assert desc.mode == "auto" and desc.params["modes"] == {"self_attn.q_proj": "official", "self_attn.v_proj": "general"}
    assert desc.targets == ["self_attn.q_proj", "self_attn.v_proj"]
    again = train(stories_path, "condlora", init=result.output, device="cpu", **{**FAST, "steps": 1, "lr": 1e-12})
    ids = token_ids(512, seed=2)
    torch.testing.assert_close(logits(again.model, ids), logits(result.model, ids), atol=1e-4, rtol=0)


@pytest.mark.realmodel
def test_refuses_to_overwrite_before_training(stories_path, trained):
    with pytest.raises(ConfigError, match="not empty"):
        train(stories_path, "lora", out=trained["lora"].output, **FAST)


@pytest.mark.parametrize("method", ["lora", "condlora", "chain"])
def test_gpt2_conv1d(tiny_gpt2, tmp_path, method):
    """GPT-2's Conv1D (weight stored (n, m)) is found by duck typing; PEFT loads it with fan_in_fan_out."""
    model, folder = tiny_gpt2
    extra = {"links": 2} if method == "chain" else {}
    result = train(folder, method, out=tmp_path / "out", device="cpu", **FAST, **extra)
    adapter = lora_lens.load_adapter(tmp_path / "out" / ("peft" if method == "condlora" else ""))
    assert adapter.module_types == ["attn.c_attn"] and {m.layout for m in adapter} == {"conv1d"}
    assert adapter.modules[0].shape == (96, 32)
    assert_peft_matches_trainer(result, folder, adapter.path, method, token_ids(64, seed=3))


class ToyLM(nn.Module):
    """Any nn.Module mapping ids to logits works; no transformers involved."""

    def __init__(self, vocab=32, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.block = nn.ModuleDict({"q_proj": nn.Linear(d, d), "v_proj": nn.Linear(d, d, bias=False)})
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + torch.tanh(self.block["q_proj"](h)) * self.block["v_proj"](h)
        return self.head(h)


def test_plain_module_is_copied_not_changed(tmp_path):
    torch.manual_seed(0)
    toy = ToyLM()
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    result = train(toy, "lora", rank=2, out=tmp_path / "toy", device="cpu", **FAST)
    assert all(torch.equal(v, before[k]) for k, v in toy.state_dict().items())
    assert type(toy.block["q_proj"]) is nn.Linear
    adapter = lora_lens.load_adapter(tmp_path / "toy")
    assert adapter.names == ["block.q_proj", "block.v_proj"]
    assert result.trainable_parameters == 2 * 2 * (16 + 16)


@pytest.mark.realmodel
def test_train_log_curves_plot_in_the_report(trained):
    from matplotlib.figure import Figure

    from lora_lens.report.training_plots import plot_loss_curves

    runs = {m: json.loads((trained[m].output / "train_log.json").read_text())["curves"] for m in ("lora", "chain")}
    artists = plot_loss_curves(Figure().add_subplot(), runs)
    assert len(artists) >= 4  # two train curves, two eval curves, knots, legends
