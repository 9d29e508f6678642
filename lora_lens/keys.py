"""The only place that knows how checkpoints name things.

- Module paths → :class:`LayerKey` (block index + module type) for Llama /
  Mistral / Qwen (``model.layers.N.self_attn.q_proj``), GPT-2
  (``transformer.h.N.attn.c_attn``), BERT (``encoder.layer.N.attention.self.query``),
  DistilBERT (``distilbert.transformer.layer.N.attention.q_lin``), OPT
  (``model.decoder.layers.N.self_attn.q_proj``) and anything else that numbers
  its blocks; a path with no block keeps ``block=None``.
- PEFT state-dict keys → (module path, role).
- Adapter module names ⇄ base weight names, bridging the prefixes that a task
  model adds to its base (``bert.``, ``model.``, ``transformer.``, …).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import KeyMatchError
from .types import LayerKey

PEFT_PREFIX = "base_model.model."

#: Prefixes a task model puts in front of its backbone, stripped when pairing
#: an adapter's modules with a base checkpoint's weights.
BACKBONE_PREFIXES = (
    "base_model.model.", "model.", "bert.", "roberta.", "transformer.", "distilbert.",
    "gpt_neox.", "deberta.", "electra.", "albert.", "encoder.model.", "language_model.",
)

# Containers whose numbered children are blocks; a numbered child of anything
# else (``experts.3``) is part of the module type, not the block.
_BLOCK_CONTAINERS = {"layers", "layer", "h", "blocks", "block", "decoder_layers", "encoder_layers"}


def parse_module_path(path: str) -> LayerKey:
    """Split a module path into ``prefix.<block>.module``.

    The block is the first integer component that follows a known container
    (``layers``, ``layer``, ``h``, ``blocks``, ``block``); failing that, the first
    integer component. No integer: ``LayerKey("", None, path)``.
    """
    parts = path.split(".")
    candidates = [i for i, p in enumerate(parts) if p.isdigit() and 0 < i < len(parts) - 1]
    if not candidates:
        return LayerKey("", None, path)
    known = [i for i in candidates if parts[i - 1] in _BLOCK_CONTAINERS]
    i = known[0] if known else candidates[0]
    return LayerKey(".".join(parts[:i]), int(parts[i]), ".".join(parts[i + 1:]))


def architecture_family(paths: list[str]) -> str:
    """Guess the naming family of a set of module paths (for display only)."""
    text = " ".join(paths[:50])
    for family, pattern in (
        ("gpt2", r"\bh\.\d+\.(attn|mlp)\."),
        ("distilbert", r"transformer\.layer\.\d+\.attention\.q_lin"),
        ("bert", r"layer\.\d+\.attention\.self\."),
        ("opt", r"decoder\.layers\.\d+\.self_attn\."),
        ("llama", r"layers\.\d+\.self_attn\.[qkvo]_proj"),
    ):
        if re.search(pattern, text):
            return family
    return "unknown"


@dataclass(frozen=True)
class PeftKey:
    """A PEFT state-dict key split into module path and role.

    role: ``A`` / ``B`` (LoRA factors of a Linear, Conv1D or Conv), ``emb_A`` /
    ``emb_B`` (an Embedding's factors), or ``other`` (anything else: a
    ``modules_to_save`` copy, a DoRA magnitude, a LoRA bias …).
    """

    key: str
    module: str
    role: str


_ROLES = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "emb_A", "lora_embedding_B": "emb_B"}


def strip_peft_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def parse_peft_key(key: str) -> PeftKey:
    """Classify one key of a PEFT adapter file.

    Accepts saved files (``base_model.model.X.lora_A.weight``), the same
    without the prefix, in-memory state dicts that still carry the adapter name
    (``X.lora_A.default.weight``) and embedding factors
    (``X.lora_embedding_A``).
    """
    short = strip_peft_prefix(key)
    parts = short.split(".")
    for i in range(len(parts) - 1, 0, -1):
        role = _ROLES.get(parts[i])
        if role is None:
            continue
        rest = parts[i + 1:]  # [] | [adapter] for embeddings; [weight] | [adapter, weight] otherwise
        if role.startswith("emb_"):
            ok = len(rest) <= 1 and rest != ["weight"]
        else:
            ok = rest[-1:] == ["weight"] and len(rest) <= 2
        return PeftKey(key, ".".join(parts[:i]), role if ok else "other")
    return PeftKey(key, short, "other")


def normalize_module_path(path: str) -> str:
    """Strip backbone prefixes (``bert.``, ``model.``, …) repeatedly."""
    changed = True
    while changed:
        changed = False
        for p in BACKBONE_PREFIXES:
            if path.startswith(p) and len(path) > len(p):
                path = path[len(p):]
                changed = True
    return path


def match_modules_to_weights(
    module_names: list[str], weight_names: list[str], source: str = "base checkpoint"
) -> dict[str, str]:
    """Pair module paths with the base's ``<path>.weight`` tensors.

    Exact names first; otherwise both sides are compared with backbone prefixes
    stripped (a ``BertForSequenceClassification`` adapter names
    ``bert.encoder.layer.0…`` while MiniLM's file says ``encoder.layer.0…``).
    Every module that cannot be matched is named in one error.
    """
    weights = {w[: -len(".weight")] for w in weight_names if w.endswith(".weight")}
    by_norm: dict[str, list[str]] = {}
    for w in weights:
        by_norm.setdefault(normalize_module_path(w), []).append(w)
    out, missing, ambiguous = {}, [], []
    for name in module_names:
        if name in weights:
            out[name] = name + ".weight"
            continue
        found = by_norm.get(normalize_module_path(name), [])
        if len(found) == 1:
            out[name] = found[0] + ".weight"
        elif found:
            ambiguous.append(f"{name} → {sorted(found)}")
        else:
            missing.append(name)
    if missing or ambiguous:
        parts = []
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            parts.append(f"no weight for {len(missing)} adapter module(s) in the {source}: {shown}")
        if ambiguous:
            parts.append("ambiguous matches: " + "; ".join(ambiguous[:3]))
        example = sorted(weights)[:2]
        raise KeyMatchError(
            "; ".join(parts) + f". The base names its modules like {example}; "
            "check that --base is the model this adapter was trained on."
        )
    return out


def resolve_targets(targets: str | list[str] | tuple[str, ...], module_types: list[str],
                    source: str = "the base checkpoint") -> list[str]:
    """The module types that target names select, in ``module_types`` order.

    ``targets`` is a list of names or one comma-separated string. A name
    selects every module type equal to it or ending with ``"." + name`` (PEFT's
    ``target_modules`` rule), so ``q_proj`` selects ``self_attn.q_proj`` and
    ``c_proj`` selects both ``attn.c_proj`` and ``mlp.c_proj``. Every name that
    selects nothing is reported at once, with the module types available.
    """
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)]
    names = [t for t in names if t]
    if not names:
        raise KeyMatchError(f"no targets given; expected names such as {module_types[:3]} (from {source}).")
    chosen: dict[str, None] = {}
    unknown = []
    for t in names:
        hits = [mt for mt in module_types if mt == t or mt.endswith("." + t)]
        if not hits:
            unknown.append(t)
        chosen.update(dict.fromkeys(hits))
    if unknown:
        raise KeyMatchError(
            f"unknown target(s) {unknown}: no module type in {source} is or ends with them; "
            f"available module types: {module_types}."
        )
    return [mt for mt in module_types if mt in chosen]
