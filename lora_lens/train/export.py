"""Write a trained run: a PEFT adapter folder (and CondLoRA's Θ), plus ``train_log.json``.

Layouts (all written atomically into ``OUT``)::

    lora, lora-sp, cora-*, chain    OUT/adapter_config.json, OUT/adapter_model.safetensors, OUT/train_log.json
    condlora                        OUT/lora_lens_init.json, OUT/condlora_theta.safetensors,
                                    OUT/peft/ (the equivalent PEFT adapter), OUT/train_log.json
    head-only                       OUT/head_model.safetensors (the head's tensors under the model's
                                    state-dict names), OUT/train_log.json

``--task classify`` adds the trained head to the PEFT adapter the way PEFT
saves a SEQ_CLS adapter: ``task_type: "SEQ_CLS"``, the head's module paths in
``modules_to_save`` and its tensors under ``base_model.model.<path>.<name>``,
and writes ``OUT/classes.json`` (``num_labels``, ``classes``, ``pad_token_id``),
what ``AutoModelForSequenceClassification.from_pretrained(base,
num_labels=…, pad_token_id=…)`` needs before ``PeftModel.from_pretrained(…, OUT)``.

Module names are the model's own ``named_modules`` paths, so
``PeftModel.from_pretrained(base, OUT)`` finds every module. Chain of LoRA is
written as its exact total update against the *original* base: with links
``(A_j (r, n), B_j (m, r))`` and scaling ``s``,

    ΔW = Σ_j s B_j A_j = B_tot A_tot,   B_tot = [s B_1 | … | s B_M] (m, M·r),   A_tot = [A_1; …; A_M] (M·r, n),

saved with rank ``M·r`` and scaling 1 (``lora_alpha = M·r``). CondLoRA's
PEFT adapter holds each layer's ``A, B = Θ.factors(W0)``; the Θ file with its
JSON is an init folder (:mod:`lora_lens.io.initfile`) a later run can start from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import __version__
from ..io import THETA_NAME, InitDescription, atomic_directory, atomic_save_safetensors, atomic_write_json
from ..io import save_peft_adapter, write_init_description
from ..jsonable import stamp
from ..keys import parse_module_path
from ..types import LoraModule
from .loop import Run, TrainResult

LOG_NAME = "train_log.json"
CLASSES_NAME = "classes.json"
HEAD_NAME = "head_model.safetensors"


def _module(path: str, A: torch.Tensor, B: torch.Tensor, alpha: float, scaling: float, layout: str) -> LoraModule:
    return LoraModule(name=path, key=parse_module_path(path), A=A.detach().cpu().contiguous(),
                      B=B.detach().cpu().contiguous(), alpha=alpha, scaling=scaling, layout=layout)


@torch.no_grad()
def adapter_modules(run: Run) -> list[LoraModule]:
    """The run's update as PEFT LoRA pairs, one per adapted module (model paths)."""
    out = []
    for path, layer in run.adapted.layers.items():
        if run.config.method == "chain":
            links = [link[path] for link in run.links]
            A = torch.cat([a for a, _ in links], dim=0)  # (M·r, n)
            B = torch.cat([layer.scaling * b for _, b in links], dim=1)  # (m, M·r)
            out.append(_module(path, A, B, float(A.shape[0]), 1.0, layer.layout))
        else:
            A, B = layer.factors()
            out.append(_module(path, A, B, layer.alpha, layer.scaling, layer.layout))
    return out


def head_tensors(run: Run) -> dict[str, torch.Tensor]:
    """The head's tensors by state-dict name (``classifier.weight`` …); empty without a head."""
    if run.task.head is None:
        return {}
    return {f"{path}.{name}": t.detach().cpu().contiguous() for path in run.task.head.paths
            for name, t in run.model.get_submodule(path).state_dict().items()}


def classes_description(run: Run) -> dict:
    head = run.task.head
    return {"num_labels": head.num_labels, "classes": run.task.data.classes, "pad_token_id": head.pad_token_id,
            "head": list(head.paths), "problem_type": "single_label_classification"}


def provenance(run: Run) -> dict[str, str]:
    """Safetensors metadata: strings only."""
    return {"method": run.config.method, "lora_lens_version": __version__,
            "params": json.dumps(run.config.as_dict(), default=str), **{k: str(v) for k, v in run.provenance.items()}}


def save_run(run: Run, result: TrainResult, out: str | Path, overwrite: bool = False) -> Path:
    """Write the adapter (and Θ for CondLoRA) and ``train_log.json`` into ``out``, atomically."""
    meta = provenance(run)
    modules = adapter_modules(run)
    base_name = run.provenance.get("base")
    head = head_tensors(run)
    classify = run.task.name == "classify"
    peft_extra = dict(task_type="SEQ_CLS", modules_to_save=list(run.task.head.paths), extra_tensors=head) \
        if classify else {}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        if run.config.method == "head-only":
            atomic_save_safetensors(head, tmp / HEAD_NAME, meta)
        elif run.config.method == "condlora":
            a = run.adapted
            theta = {}
            for t, th in a.thetas.items():
                theta[f"{t}.theta_A"], theta[f"{t}.theta_B"] = th.theta_A.detach(), th.theta_B.detach()
            atomic_save_safetensors(theta, tmp / THETA_NAME, meta)
            write_init_description(tmp, InitDescription(
                method="condlora", rank=a.rank, alpha=a.alpha, targets=list(a.thetas), mode=a.mode,
                peft_adapter="peft", theta_file=THETA_NAME, params={"trained": run.config.as_dict(), "modes": a.modes},
                sources=[s for s in (base_name, a.init_source) if s],
            ))
            save_peft_adapter(tmp / "peft", modules, base_model_name_or_path=base_name, metadata=meta, **peft_extra)
        else:
            # ``tmp`` exists and is empty: save_peft_adapter fills it (atomically, by its own rename).
            save_peft_adapter(tmp, modules, base_model_name_or_path=base_name, metadata=meta, **peft_extra)
        if classify:
            atomic_write_json(tmp / CLASSES_NAME, classes_description(run))
        atomic_write_json(tmp / LOG_NAME, stamp("train_run", {
            **result.to_dict(), "output": str(out), "config": run.config.as_dict(), "provenance": run.provenance,
            "curves": result.curves()}))
    return Path(out)
