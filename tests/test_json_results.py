"""Every top-level JSON result the CLI prints (``--json``) or writes carries ``kind``, ``lora_lens_version`` and
``schema``, and its kind is documented in docs/formats.md. Train, compare-methods and demo are checked in their
own (slower) tests with the same helper."""

import json
import re
import shutil
from pathlib import Path

from lora_lens.jsonable import SCHEMAS, stamp

from .cli_utils import formats_doc, assert_stamped, run


def _json(r, kind):
    assert r.exit_code == 0, r.output
    return assert_stamped(json.loads(r.stdout), kind)


def _file(path, kind):
    return assert_stamped(json.loads(Path(path).read_text()), kind)


def test_every_schema_kind_is_documented_and_no_undocumented_kind():
    doc = formats_doc()
    section = doc[doc.index("## JSON results"):]
    documented = dict(re.findall(r"^\| `(\w+)` \| (\d+) \|", section, flags=re.M))
    assert {k: int(v) for k, v in documented.items()} == SCHEMAS


def test_stamp_refuses_an_unknown_kind():
    import pytest

    with pytest.raises(ValueError, match="unknown result kind 'nope'"):
        stamp("nope", {})


def test_inspect_spectrum_similarity_alignment(llama_adapter, tiny_llama, tmp_path):
    ad, base = llama_adapter[1], tiny_llama[1]
    _json(run("inspect", ad, "--json"), "adapter")
    _json(run("inspect", base, "--json"), "base")
    two = tmp_path / "two"
    shutil.copytree(ad, two)
    shutil.copytree(ad, two / "other")  # a named adapter beside the default one
    _json(run("inspect", two, "--json"), "adapters")
    _json(run("spectrum", ad, "--json"), "spectra")
    _json(run("similarity", ad, "--json"), "layer_similarity")
    d = _json(run("similarity", ad, ad, "--json"), "pairwise_similarity")
    assert_stamped(d["pairs"][0], "adapter_similarity")
    d = _json(run("alignment", ad, "--base", base, "--intruder-k", 2, "--json"), "alignment_analysis")
    assert_stamped(d["alignment"], "alignment") and assert_stamped(d["intruders"], "intruders")


def test_methods_convert_and_report(llama_adapter, tiny_llama, tmp_path):
    ad, base = llama_adapter[1], tiny_llama[1]
    _json(run("condlora", "init", "--base", base, "--rank", 2, "--targets", "q_proj", "-o", tmp_path / "cl",
              "--json"), "init")
    _json(run("condlora", "analyze", tmp_path / "cl" / "peft", "--base", base, "--json"), "condlora_analysis")
    _json(run("cora", "basis", "--base", base, "--rank", 2, "--targets", "q_proj", "-o", tmp_path / "b", "--json"),
          "cora_basis")
    _file(tmp_path / "b" / "cora_basis.json", "cora_basis")
    _json(run("pissa", "--base", base, "--rank", 2, "--targets", "q_proj", "-o", tmp_path / "p", "--json"), "init")
    _json(run("reduce", ad, "--rank", 1, "-o", tmp_path / "r", "--json"), "reduced_adapter")
    _json(run("convert", ad, "-o", tmp_path / "c", "--json"), "converted")
    _json(run("report", ad, "-o", tmp_path / "rep", "--json"), "report_written")
    res = _file(tmp_path / "rep" / "results.json", "report")
    assert_stamped(res["data"], "analysis")


def test_collection_and_its_report(planted_collection, tmp_path):
    paths = planted_collection[0][:3]
    out = tmp_path / "coll"
    _json(run("collection", *paths, "-o", out, "--json"), "collection")
    _file(out / "collection.json", "collection")
    _file(out / "report" / "results.json", "report")
    _json(run("report", out, "-o", tmp_path / "rep", "--json"), "report_written")
    _file(tmp_path / "rep" / "results.json", "report")


def test_to_jsonable_takes_every_tensor_dtype():
    """numpy has no bfloat16: a bf16 tensor (a half-precision adapter's factors) in json_data must not crash
    the one converter. Values chosen exactly representable in bf16, so the comparison is exact."""
    import torch

    from lora_lens.jsonable import to_jsonable

    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        t = torch.tensor([[1.5, float("nan")], [-0.25, float("inf")]], dtype=dtype)
        assert to_jsonable({"t": t}) == {"t": [[1.5, None], [-0.25, None]]}, dtype
    assert to_jsonable(torch.tensor(3, dtype=torch.int64)) == 3 and to_jsonable(torch.tensor(True)) is True
