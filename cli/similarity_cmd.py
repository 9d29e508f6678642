"""``lora-lens similarity A [B …]``: φ across layers of one adapter, or across adapters."""

from __future__ import annotations

import warnings

import click

from .common import echo_json, echo_warnings, table
from .options import (compute_options, format_option, json_option, progress_option, seed_option, side_option,
                      top_k_option)


@click.command("similarity")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--base", type=click.Path(path_type=str), help="Base checkpoint (needed for --what base).")
@click.option("--what", type=click.Choice(["delta", "A", "B", "base"]), default="delta", show_default=True,
              help="Subspace compared: ΔW's column space, A's row space, B's column space, W0's top-k column space.")
@top_k_option("Top directions kept (default: all r; for base: r); clipped to what a module has.", old="--k")
@side_option
@seed_option
@json_option
@compute_options
@progress_option("decomposing LoRA modules")
@format_option
def similarity_cmd(adapters, base, what, top_k, side, seed, as_json, compute, fmt) -> None:
    """Subspace similarity φ (LoRA paper §7) with a random baseline beside every number.

    One adapter: per module type, the layers × layers grid of
    φ = ‖U_aᵀ U_b‖_F² / min(k_a, k_b). Two or more adapters (or a folder of
    named adapters): every pair, module by module, with φ at i = j = the pair's
    smaller rank (the number `collection` gives for the pair), principal
    angles, Grassmann distance and (in --json) the φ(i, j) grid.

    \b
    Examples:
      lora-lens similarity ./my-adapter
      lora-lens similarity ./my-adapter --what base --base stories260K --top-k 16
      lora-lens similarity ./seed0 ./seed1 --what A --json
      lora-lens similarity ./r8 ./r64 --what A
    """
    from lora_lens import load_adapters, open_base
    from lora_lens.compare import layer_similarity, pairwise_similarity

    loaded = [a for path in adapters for a in load_adapters(path, fmt)]
    b = open_base(base) if base else None
    kw = dict(what=what, k=top_k, side=side, compute=compute, seed=seed)
    with warnings.catch_warnings(record=True) as caught:  # k clipped to the rank: one line per adapter
        warnings.simplefilter("always")
        if len(loaded) == 1:
            result = layer_similarity(loaded[0], base=b, **kw)
        else:
            pairs = pairwise_similarity(loaded, **kw)
    echo_warnings(list({str(w.message): w for w in caught}.values()))
    if len(loaded) == 1:
        echo_json(result.to_dict()) if as_json else click.echo(render_layers(result))
        return
    if as_json:
        from lora_lens import stamp

        echo_json(stamp("pairwise_similarity", {"adapters": [a.label for a in loaded],
                                                "pairs": [p.to_dict() for p in pairs]}))
    else:
        click.echo("\n".join(render_pair(p) for p in pairs))


def _head(what: str, side: str, ks) -> str:
    """The title line's end: what was compared and the k actually used (``ks``: every module's)."""
    space = {"out": "output space, left singular vectors", "in": "input space, right singular vectors",
             "both": "output and input spaces, φ averaged"}[side]
    lo, hi = min(ks), max(ks)
    return f"φ of {what} ({space}), k = {lo if lo == hi else f'{lo}–{hi}'}"


def side_note(what: str, side: str) -> str:
    from lora_lens.compare import side_note as note

    return note(what, side)


def _cell(x: float) -> str:
    return "   -" if x != x else (" 1.0" if x > 0.995 else f"{x:4.2f}"[1:].rjust(4))


def render_layers(res) -> str:
    out = [f"Adapter {res.adapter}: layers × layers {_head(res.what, res.side, [k for g in res.grids for k in g.ks])}",
           f"Baseline: Haar-random subspaces of the same dims, mean of {res.draws} draws (seed {res.seed}); "
           "expected max(k_a, k_b)/d.", side_note(res.what, res.side)]
    out += [f"note: {n}" for n in res.notes]
    for g in res.grids:
        s = g.summary()
        ks = sorted(set(g.ks))
        out += ["", f"{g.module_type}  d={g.dim}  k={','.join(map(str, ks))}  ({len(g.blocks)} layers)",
                _summary_line("mean off-diagonal φ", s, ""), _summary_line("deeper half       ", s, "deep_")]
        rows, cols = block_labels(g.blocks, g.block_names)
        w = max(4, max(len(x) for x in rows))
        out.append(" " * (w + 2) + " ".join(x.rjust(4) for x in cols))
        just = str.rjust if rows == cols else str.ljust  # indices right-aligned, names left-aligned
        for lab, row in zip(rows, g.phi.tolist()):
            out.append(f"  {just(lab, w)}" + " ".join(_cell(x) for x in row))
    return "\n".join(out) + "\n"


def block_labels(blocks, names) -> tuple[list[str], list[str]]:
    """Row and column labels of a layers × layers grid: the block index, or where the index is a position
    code (diffusion UNets) the readable block name per row and the row number per column."""
    if not any(names):
        labels = ["-" if b is None else str(b) for b in blocks]
        return labels, labels
    cols = [str(i) for i in range(len(blocks))]
    return [f"{i} {n or ('-' if b is None else b)}" for i, (b, n) in zip(cols, zip(blocks, names))], cols


def _summary_line(label: str, s: dict, tag: str) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3f}"
    return (f"  {label} {f(s[tag + 'mean_offdiag'])}   random {f(s[tag + 'random_mean_offdiag'])}   "
            f"expected {f(s[tag + 'expected_mean_offdiag'])}")


def render_pair(p) -> str:
    s = p.summary()
    out = [f"{p.a} vs {p.b}: {_head(p.what, p.side, [k for m in p.modules for k in (m.k_a, m.k_b)])}",
           f"  {s['modules']} matched modules: mean φ {_f(s['phi'])} (random {_f(s['random_phi'])}, "
           f"expected {_f(s['expected_phi'])}); mean Grassmann {_f(s['grassmann'])} "
           f"(random {_f(s['random_grassmann'])})", f"  {side_note(p.what, p.side)}"]
    rows = [[m.name, m.k_a, m.k_b, m.phi, m.baseline.phi, m.baseline.expected_phi, m.phi_full,
             float(m.angles_deg.mean()), m.grassmann, m.baseline.grassmann] for m in p.modules]
    header = ["module", "k_a", "k_b", "φ", "random", "expected", "φ(k_a,k_b)", "mean θ°", "Grassmann", "random"]
    out += ["", table(rows, header)]
    out += [f"note: {n}" for n in p.notes]
    for side, names in ((p.a, p.unmatched_a), (p.b, p.unmatched_b)):
        if names:
            out.append(f"only in {side} ({len(names)}): " + ", ".join(names[:5]) + (" …" if len(names) > 5 else ""))
    return "\n".join(out) + "\n"


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"
