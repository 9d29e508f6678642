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


def test_unet_and_dit_blocks_are_distinct_and_in_network_order():
    paths = [
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.1.attn1.to_q",
        "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    ]
    keys = [parse_module_path(p) for p in paths]
    assert {k.module for k in keys} == {"attn1.to_q"}
    assert len({k.block for k in keys}) == len(paths)
    ordered = [k.block_name for k in sorted(keys, key=lambda k: k.sort_key())]
    assert ordered == [
        "unet.down_blocks.0.attentions.0.transformer_blocks.0", "unet.down_blocks.0.attentions.0.transformer_blocks.1",
        "unet.down_blocks.0.attentions.1.transformer_blocks.0", "unet.mid_block.attentions.0.transformer_blocks.0",
        "unet.up_blocks.0.attentions.0.transformer_blocks.0", "unet.up_blocks.1.attentions.0.transformer_blocks.0",
    ]
    # a resnet of down_blocks.0 and of up_blocks.0: same type, different blocks
    d, u = parse_module_path("unet.down_blocks.0.resnets.1.conv1"), parse_module_path("unet.up_blocks.0.resnets.1.conv1")
    assert d.module == u.module == "resnets.conv1" and d.block < u.block
    # DiT: double-stream blocks before single-stream ones
    a = parse_module_path("transformer.transformer_blocks.18.attn.to_q")
    b = parse_module_path("transformer.single_transformer_blocks.0.attn.to_q")
    assert a.module == b.module == "attn.to_q" and a.block < b.block


@pytest.mark.parametrize("path", [
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "unet.up_blocks.2.resnets.1.conv_shortcut",
    "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "text_encoder.text_model.encoder.layers.11.self_attn.out_proj",
    "text_encoder_2.text_model.encoder.layers.0.mlp.fc1",
    "transformer.single_transformer_blocks.3.proj_mlp",
])
def test_kohya_names_round_trip(path):
    from lora_lens.keys import kohya_module_path, kohya_stem

    assert kohya_module_path(kohya_stem(path)) == path
