import pytest

from lora_lens.errors import KeyMatchError
from lora_lens.keys import match_modules_to_weights, normalize_module_path, parse_module_path, parse_peft_key
from lora_lens.types import LayerKey


@pytest.mark.parametrize(
    "path, expected",
    [
        ("model.layers.12.self_attn.q_proj", LayerKey("model.layers", 12, "self_attn.q_proj")),
        ("transformer.h.3.attn.c_attn", LayerKey("transformer.h", 3, "attn.c_attn")),
        ("bert.encoder.layer.0.attention.self.query", LayerKey("bert.encoder.layer", 0, "attention.self.query")),
        ("distilbert.transformer.layer.5.attention.q_lin", LayerKey("distilbert.transformer.layer", 5, "attention.q_lin")),
        ("model.decoder.layers.7.self_attn.v_proj", LayerKey("model.decoder.layers", 7, "self_attn.v_proj")),
        # a numbered expert belongs to the module type, the block is the layer
        ("model.layers.2.block_sparse_moe.experts.3.w1", LayerKey("model.layers", 2, "block_sparse_moe.experts.3.w1")),
        ("lm_head", LayerKey("", None, "lm_head")),
        ("some.custom.0proj", LayerKey("", None, "some.custom.0proj")),
    ],
)
def test_parse_module_path(path, expected):
    assert parse_module_path(path) == expected
    if expected.block is not None:
        assert str(parse_module_path(path)) == path


@pytest.mark.parametrize(
    "key, module, role",
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.0.self_attn.q_proj", "A"),
        ("model.layers.0.self_attn.q_proj.lora_B.weight", "model.layers.0.self_attn.q_proj", "B"),
        ("model.layers.0.self_attn.q_proj.lora_A.default.weight", "model.layers.0.self_attn.q_proj", "A"),
        ("base_model.model.model.embed_tokens.lora_embedding_A", "model.embed_tokens", "emb_A"),
        ("base_model.model.model.embed_tokens.lora_embedding_B", "model.embed_tokens", "emb_B"),
        ("base_model.model.lm_head.weight", "lm_head.weight", "other"),
        ("base_model.model.x.lora_B.bias", "x", "other"),
        ("base_model.model.x.lora_magnitude_vector", "x.lora_magnitude_vector", "other"),
    ],
)
def test_parse_peft_key(key, module, role):
    pk = parse_peft_key(key)
    assert (pk.module, pk.role) == (module, role)


def test_normalize_and_match_bridge_task_prefixes():
    assert normalize_module_path("bert.encoder.layer.0.attention.self.query") == "encoder.layer.0.attention.self.query"
    base = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.query.bias",
            "encoder.layer.1.attention.self.query.weight"]
    got = match_modules_to_weights(["bert.encoder.layer.0.attention.self.query",
                                    "bert.encoder.layer.1.attention.self.query"], base)
    assert got == {"bert.encoder.layer.0.attention.self.query": base[0],
                   "bert.encoder.layer.1.attention.self.query": base[2]}
    # the reverse: adapter on the bare backbone, base file of the task model
    got = match_modules_to_weights(["layers.0.q"], ["model.layers.0.q.weight"])
    assert got == {"layers.0.q": "model.layers.0.q.weight"}


def test_match_reports_every_missing_module_at_once():
    with pytest.raises(KeyMatchError) as e:
        match_modules_to_weights(["a.0.q", "a.1.q", "a.0.v"], ["a.0.q.weight"])
    msg = str(e.value)
    assert "2 adapter module(s)" in msg and "a.1.q" in msg and "a.0.v" in msg
