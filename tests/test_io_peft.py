"""Adapters written by the real PEFT library are read bit-exact, with PEFT's own scaling."""

import json
import shutil

import pytest
import torch

from lora_lens import ConfigError, load_adapter, load_adapters, save_peft_adapter
from lora_lens.inspect import inspect_path
from lora_lens.io.peft import pattern_key

from .adapter_utils import make_peft_adapter


def _peft_layers(pm, adapter="default"):
    """{module path: PEFT LoraLayer} for every wrapped module."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.r:
            out[name] = mod
    return out


def _assert_matches_peft(adapter, pm, adapter_name="default"):
    layers = _peft_layers(pm, adapter_name)
    assert sorted(layers) == sorted(adapter.names)
    for name, layer in layers.items():
        mod = adapter[name]
        if mod.layout == "embedding":
            A, B = layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
        else:
            A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        assert torch.equal(mod.A, A.detach()), name
        assert torch.equal(mod.B, B.detach()), name
        assert mod.scaling == layer.scaling[adapter_name], name
        assert mod.rank == layer.r[adapter_name]
        # ΔW in the base layout equals PEFT's own get_delta_weight
        ref = layer.get_delta_weight(adapter_name).double()
        assert torch.allclose(mod.delta(base_layout=True), ref, atol=1e-6), name


def test_llama_rank_and_alpha_pattern(llama_adapter):
    pm, folder = llama_adapter
    ad = load_adapter(folder)
    _assert_matches_peft(ad, pm)
    assert ad["model.layers.1.self_attn.q_proj"].rank == 2
    assert ad["model.layers.0.self_attn.q_proj"].rank == 4
    assert ad["model.layers.2.mlp.down_proj"].scaling == 3.0 / 4
    assert ad.module_types == ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"] or set(ad.module_types) == {
        "mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"}
    assert all(m.layout == "linear" for m in ad)
    assert ad.delta_is_sBA and not ad.flags


def test_gpt2_conv1d_fan_in_fan_out(gpt2_adapter, tiny_gpt2):
    pm, folder = gpt2_adapter
    ad = load_adapter(folder)
    _assert_matches_peft(ad, pm)
    m = ad["transformer.h.0.attn.c_attn"]
    assert m.layout == "conv1d"
    base_w = tiny_gpt2[0].transformer.h[0].attn.c_attn.weight
    assert m.base_shape == tuple(base_w.shape) == (32, 96)


def test_bert_rslora_bin_and_modules_to_save(bert_adapter):
    pm, folder = bert_adapter
    assert (folder / "adapter_model.bin").is_file()
    ad = load_adapter(folder)
    _assert_matches_peft(ad, pm)
    assert ad.settings.use_rslora
    assert ad["bert.encoder.layer.0.attention.self.query"].scaling == pytest.approx(4 / 8 ** 0.5)
    others = {o.name for o in ad.other_tensors}
    assert any("classifier" in o for o in others)
    assert not any("classifier" in n for n in ad.names)  # never paired


def test_named_adapter_subfolder(tiny_llama, tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = tiny_llama
    pm = make_peft_adapter(model, tmp_path / "unused", r=2, lora_alpha=2, target_modules=["q_proj"])
    pm.add_adapter("second", peft.LoraConfig(r=3, lora_alpha=6, target_modules=["v_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "both")
    assert (tmp_path / "both" / "second" / "adapter_config.json").is_file()
    found = load_adapters(tmp_path / "both")
    assert [a.adapter_name for a in found] == [None, "second"]
    second = load_adapter(tmp_path / "both", adapter_name="second")
    _assert_matches_peft(second, pm, "second")
    info = inspect_path(tmp_path / "both")
    assert info["kind"] == "adapters" and len(info["adapters"]) == 2


def test_embedding_and_dora_are_flagged(tiny_llama, tmp_path):
    model, _ = tiny_llama
    pm = make_peft_adapter(model, tmp_path / "dora", r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens"],
                           use_dora=True)
    ad = load_adapter(tmp_path / "dora")
    assert not ad.delta_is_sBA and any("DoRA" in f for f in ad.flags)
    emb = ad["model.embed_tokens"]
    assert emb.layout == "embedding" and emb.base_shape == (64, 32)
    layer = _peft_layers(pm)["model.embed_tokens"]
    assert torch.allclose(emb.delta(base_layout=True), layer.get_delta_weight("default").double(), atol=1e-6)
    assert any(o.name.endswith("lora_magnitude_vector") for o in ad.other_tensors)


def test_pattern_key_matches_peft():
    from peft.utils.other import get_pattern_key

    keys = ["q_proj", "layers.1.self_attn.q_proj", "down.*"]
    for name in ["model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                 "model.layers.0.mlp.up_proj", "xq_proj"]:
        ours = pattern_key(keys, name)
        theirs = get_pattern_key(keys, name)
        assert (ours if ours is not None else name) == theirs


def test_save_round_trip_and_peft_loads_it(llama_adapter, tiny_llama, tmp_path):
    from peft import PeftModel

    pm, folder = llama_adapter
    ad = load_adapter(folder)
    out = save_peft_adapter(tmp_path / "copy", ad.modules, metadata={"method": "copy"})
    again = load_adapter(out)
    for a, b in zip(ad, again):
        assert a.name == b.name and torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
        assert a.scaling == pytest.approx(b.scaling, rel=1e-12)
    model, _ = tiny_llama
    import copy

    loaded = PeftModel.from_pretrained(copy.deepcopy(model), out).eval()
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, pm(ids).logits, atol=1e-5)
    with pytest.raises(ConfigError, match="--overwrite"):
        save_peft_adapter(out, ad.modules)


def test_unknown_config_keys_ignored(llama_adapter, tmp_path):
    _, folder = llama_adapter
    dst = tmp_path / "a"
    shutil.copytree(folder, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["some_future_option"] = {"x": 1}
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    assert len(load_adapter(dst)) == len(load_adapter(folder))


def test_a_linear_whose_path_says_embedding_is_not_an_embedding(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file({"base_model.model.time_embedding.linear_1.lora_A.weight": torch.randn(2, 8),
               "base_model.model.time_embedding.linear_1.lora_B.weight": torch.randn(6, 2)},
              str(tmp_path / "adapter_model.safetensors"))
    m = load_adapter(tmp_path)["time_embedding.linear_1"]
    assert m.layout == "linear" and m.base_shape == (6, 8)


def test_a_foreign_lora_lens_init_json_beside_an_adapter_is_ignored(llama_adapter, tmp_path):
    """The reader looks for a CondLoRA folder's own adapter in the parent's lora_lens_init.json; one holding
    something else (a list) is not an init description, so the adapter reads as usual (it crashed)."""
    shutil.copytree(llama_adapter[1], tmp_path / "ad")
    (tmp_path / "lora_lens_init.json").write_text("[1, 2]")
    assert load_adapter(tmp_path / "ad").label == "ad"
    assert load_adapter(tmp_path / "ad" / "adapter_model.safetensors").label == "ad"


def _bert_seq_cls():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def test_lora_inside_modules_to_save_copies_is_listed_apart_never_paired(tmp_path):
    """Issue 20 #6. PEFT 0.21 refuses a LoRA on a layer it also wraps as modules_to_save (it excludes such layers
    from target matching, and ModulesToSaveWrapper raises TypeError on a LoRA layer), but older PEFT wrapped the
    LoRA layer and saved it three times. The file below follows that save rule (get_peft_model_state_dict: the
    'lora_' keys, then every key under '<m>.modules_to_save.<adapter>' with 'modules_to_save.' removed, then
    '.<adapter>' removed): '<m>.original_module.lora_A' (the untrained copy), '<m>.modules_to_save.lora_A' (the
    trained one), '<m>.lora_A' (its second spelling, what PEFT reloads) and '<m>.base_layer.weight' (the trained
    copy of the base weight). Only '<m>.lora_A/B' is a module; the copies are other tensors; the trained
    base copy is flagged and delta_is_sBA is false."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(_bert_seq_cls(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "classifier"],
                                                             init_lora_weights=False))
    trained = {k: v.detach().clone() for k, v in pm.state_dict().items() if ".classifier." in k}
    untrained = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in trained.items()}  # B = 0 at init
    sd = {k.replace(".default", ""): v.detach().clone() for k, v in pm.state_dict().items() if "lora_" in k}
    sd = {k: v for k, v in sd.items() if ".classifier." not in k}  # the query pair
    for k, v in untrained.items():  # base_model.model.classifier.original_module.<lora_A.default.weight …>
        if "lora_" in k:
            sd[k.replace(".classifier.", ".classifier.original_module.").replace(".default", "")] = v
    for k, v in trained.items():  # …classifier.modules_to_save.default.<…>: 'lora_' filter, then the copy loop
        if "lora_" in k:
            sd[k.replace(".classifier.", ".classifier.modules_to_save.").replace(".default", "")] = v
        sd[k.replace(".default", "")] = v  # modules_to_save. and .default removed: classifier.lora_A / base_layer
    folder = tmp_path / "a"
    folder.mkdir()
    from safetensors.torch import save_file
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "SEQ_CLS", "r": 2, "lora_alpha": 4, "target_modules": ["query", "classifier"],
        "modules_to_save": ["classifier", "score"]}))
    assert {"base_model.model.classifier.original_module.lora_A.weight", "base_model.model.classifier.lora_A.weight",
            "base_model.model.classifier.modules_to_save.lora_A.weight",
            "base_model.model.classifier.base_layer.weight"} <= set(sd)

    a = load_adapter(folder)
    assert sorted(a.names) == ["bert.encoder.layer.0.attention.self.query", "classifier"]
    assert torch.equal(a["classifier"].B, trained["base_model.model.classifier.lora_B.default.weight"])
    others = {t.name for t in a.other_tensors}
    assert {"classifier.original_module.lora_A.weight", "classifier.modules_to_save.lora_B.weight",
            "classifier.base_layer.weight"} <= others
    assert any(f.startswith("modules_to_save copies: 4 LoRA factor(s)") for f in a.flags), a.flags
    assert any(f.startswith("trained base copy: ['classifier']") for f in a.flags), a.flags
    assert a.delta_is_sBA is False


def test_current_peft_modules_to_save_is_not_a_trained_base_copy(tmp_path):
    """What PEFT 0.21 writes for SEQ_CLS (LoRA on query, the classifier a modules_to_save copy 'classifier.weight'):
    one module, the copy listed apart, and no trained-base-copy flag (no LoRA sits on the copy)."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(_bert_seq_cls(), peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4,
                                                             target_modules=["query"], init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    a = load_adapter(tmp_path)
    assert a.names == ["bert.encoder.layer.0.attention.self.query"]
    assert {"classifier.weight", "classifier.bias"} <= {t.name for t in a.other_tensors}
    assert not any(f.startswith(("trained base copy", "modules_to_save copies")) for f in a.flags)
    assert a.delta_is_sBA is True
