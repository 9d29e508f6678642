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
    "gpt_neox.", "deberta.", "electra.", "albert.", "encoder.model.", "language_model.", "unet.",
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
    diffusion = parse_diffusion_path(path)
    if diffusion is not None:
        return diffusion
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
        ("unet", r"\b(down_blocks\.\d+|mid_block|up_blocks\.\d+)\."),
        ("dit", r"\b(single_)?transformer_blocks\.\d+\."),
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
#: Path components of PEFT's ``ModulesToSaveWrapper`` copies of a layer: factors under them are copies, never a module.
PEFT_COPY_PARTS = ("modules_to_save", "original_module")


def peft_copy(path: str) -> bool:
    """True for a key or module path inside a ``modules_to_save`` wrapper's copies (``X.modules_to_save.…``,
    ``X.original_module.…``): older PEFT saved a LoRA on such a layer three times (see docs/formats.md)."""
    return any(part in PEFT_COPY_PARTS for part in path.split("."))


def strip_peft_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def parse_peft_key(key: str) -> PeftKey:
    """Classify one key of a PEFT adapter file.

    Accepts saved files (``base_model.model.X.lora_A.weight``), the same
    without the prefix, in-memory state dicts that still carry the adapter name
    (``X.lora_A.default.weight``) and embedding factors
    (``X.lora_embedding_A``). Factors inside a ``modules_to_save`` wrapper's copies
    (:func:`peft_copy`) are ``other``: listed apart, never paired.
    """
    short = strip_peft_prefix(key)
    if peft_copy(short):
        return PeftKey(key, short, "other")
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


# --- Diffusion models: UNet / DiT block identity ------------------------------------------------

#: Stages of a diffusers UNet in the order data flows through them.
_UNET_STAGES = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
#: DiT stacks (Flux, SD3, PixArt …) in network order: double-stream blocks before single-stream ones.
_DIT_STACKS = {"transformer_blocks": 0, "single_transformer_blocks": 1}


def parse_diffusion_path(path: str) -> LayerKey | None:
    """``LayerKey`` of a diffusers UNet / DiT module path, or None when it is not one.

    The block is the module's *position in the network*, one integer that
    sorts ``down_blocks`` < ``mid_block`` < ``up_blocks`` and, inside each, by
    stage index N, sub-block M (``attentions.M`` / ``resnets.M``) and
    transformer block K: ``stage·10⁶ + N·10⁴ + M·10² + K`` for a UNet,
    ``stack·10⁶ + K`` for a DiT. So ``down_blocks.0`` and ``up_blocks.0`` stay
    distinct blocks; ``block_name`` keeps the readable path of the block. The
    module type is what follows the innermost index (``attn1.to_q``), with the
    sub-block kind in front when there is no transformer block
    (``resnets.conv1``, ``attentions.proj_in``).
    """
    parts = path.split(".")
    for i, p in enumerate(parts):
        if p in _UNET_STAGES:
            return _unet_key(parts, i)
        if p in _DIT_STACKS and i + 2 < len(parts) and parts[i + 1].isdigit():
            return LayerKey(".".join(parts[:i]), _DIT_STACKS[p] * 10 ** 6 + int(parts[i + 1]),
                            ".".join(parts[i + 2:]), block_name=".".join(parts[:i + 2]))
    return None


def _unet_key(parts: list[str], i: int) -> LayerKey | None:
    stage = _UNET_STAGES[parts[i]]
    j = i + 1
    n = 0
    if parts[i] != "mid_block":
        if j >= len(parts) or not parts[j].isdigit():
            return None
        n, j = int(parts[j]), j + 1
    m = k = 0
    kind = ""
    if j + 1 < len(parts) and parts[j + 1].isdigit():  # attentions.M / resnets.M / downsamplers.M
        kind, m, j = parts[j], int(parts[j + 1]), j + 2
    if j + 1 < len(parts) and parts[j] == "transformer_blocks" and parts[j + 1].isdigit():
        kind, k, j = "", int(parts[j + 1]), j + 2
    if j >= len(parts):
        return None
    module = ".".join(([kind] if kind else []) + parts[j:])
    block = stage * 10 ** 6 + n * 10 ** 4 + m * 10 ** 2 + k
    return LayerKey(".".join(parts[:i]), block, module, block_name=".".join(parts[:j]))


# --- kohya / sd-scripts names ⇄ diffusers module paths -----------------------------------------

#: kohya prefixes → the diffusers component they name.
KOHYA_PREFIXES = (
    ("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"), ("lora_te_", "text_encoder"), ("lora_transformer_", "transformer"),
)

#: Module names that contain an underscore, so a kohya name (dots → underscores) can be split back.
#: Longest first, so ``single_transformer_blocks`` wins over ``transformer_blocks``.
_UNDERSCORED = sorted({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "single_transformer_blocks",
    "to_q", "to_k", "to_v", "to_out", "to_qkv", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "proj_in", "proj_out", "proj_mlp", "conv_shortcut", "time_emb_proj", "time_embedding", "linear_1",
    "linear_2", "conv_in", "conv_out", "conv_norm_out", "add_embedding", "text_model", "self_attn", "q_proj",
    "k_proj", "v_proj", "out_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "final_layer_norm",
    "layer_norm1", "layer_norm2", "embed_tokens", "lm_head", "norm_out", "x_embedder", "context_embedder",
    "time_text_embed", "timestep_embedder", "text_embedder", "guidance_embedder", "norm_added_q",
    "norm_added_k", "self_attention", "cross_attention", "token_embedding", "position_embedding",
    "text_projection", "lora_down", "lora_up",
    # DiT (Flux / SD3) and T5 module names, so that a name written by :func:`kohya_name` reads back
    # as the same path
    "ff_context", "norm1_context", "pos_embed", "wi_0", "wi_1",
    # the original model names sd-scripts uses for SDXL's UNet (SGM) and for Flux (BFL) / SD3 (SAI MMDiT)
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod",
    "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "in_layer", "out_layer", "final_layer",
    "joint_blocks", "x_block", "context_block", "adaLN_modulation", "x_embedder", "t_embedder", "y_embedder",
}, key=lambda s: -s.count("_"))


def kohya_module_path(stem: str) -> str | None:
    """A kohya module name (``lora_unet_down_blocks_0_…_attn1_to_q``) as a diffusers path
    (``unet.down_blocks.0.….attn1.to_q``); None when the name has no kohya prefix.

    kohya writes ``"lora_" + component + "_" + path.replace(".", "_")``; the
    underscores that belong to a module name (``to_q``, ``down_blocks``) are
    recovered from the table of such names above, the others become dots.
    """
    for prefix, component in KOHYA_PREFIXES:
        if stem.startswith(prefix):
            rest = stem[len(prefix):]
            break
    else:
        return None
    tokens = rest.split("_")
    out: list[str] = []
    i = 0
    while i < len(tokens):
        for name in _UNDERSCORED:
            width = name.count("_") + 1
            if "_".join(tokens[i:i + width]) == name:
                out.append(name)
                i += width
                break
        else:
            out.append(tokens[i])
            i += 1
    return f"{component}.{'.'.join(out)}"


def kohya_stem(module_path: str) -> str:
    """The kohya name of a diffusers module path (``unet.x.y`` → ``lora_unet_x_y``)."""
    component, _, rest = module_path.partition(".")
    prefix = {c: p for p, c in reversed(KOHYA_PREFIXES)}.get(component)
    if prefix is None or not rest:
        raise KeyMatchError(f"'{module_path}': no kohya name for component '{component}'; expected unet., "
                            "text_encoder., text_encoder_2. or transformer.")
    return prefix + rest.replace(".", "_")


def diffusers_module_path(stem: str) -> str:
    """A diffusers LoRA module stem in today's module path.

    The attention-processor generation names ``…attn1.processor.to_q_lora``
    (→ ``…attn1.to_q``; ``to_out_lora`` → ``to_out.0``); the text-encoder
    generation ``…q_proj.lora_linear_layer`` (→ ``…q_proj``).
    """
    stem = stem.removesuffix(".lora_linear_layer").removesuffix(".lora")
    m = re.fullmatch(r"(.*)\.processor\.(to_[a-z]+)_lora", stem)
    if m:
        stem = f"{m.group(1)}.{m.group(2)}" + (".0" if m.group(2) == "to_out" else "")
    if stem.split(".", 1)[0] in _UNET_ROOTS:  # UNet.save_attn_procs wrote no component prefix: it is the UNet
        stem = "unet." + stem
    return stem


#: Top-level modules of a diffusers UNet, for files saved without the ``unet.`` component prefix.
_UNET_ROOTS = {"down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding", "add_embedding"}


# --- Writing diffusion adapters: which pipeline component a module belongs to, and its kohya name ----

#: Diffusion pipeline components whose modules one adapter file may hold (kohya prefix ⇄ diffusers prefix).
DIFFUSION_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
#: Top-level modules of a diffusers DiT (Flux, SD3), for paths written without the ``transformer.`` prefix.
_DIT_ROOTS = {"transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
              "time_text_embed", "norm_out", "proj_out", "pos_embed"}


def diffusion_component(path: str, *, prefixed: bool, hint: str | None = None) -> tuple[str | None, str]:
    """``(component, path inside it)`` of a module path, or ``(None, path)`` when it names no pipeline component.

    ``prefixed``: the path starts with its component (``unet.down_blocks.0…``), as kohya, LyCORIS and
    diffusers files are read; a PEFT folder holds one model, so its paths do not, and its component is
    ``hint`` (the folder's name, ``OUT/unet`` as ``convert --to peft`` writes it) or recognised from the
    path's root (``down_blocks`` → unet, ``transformer_blocks`` → transformer, ``text_model`` →
    text_encoder). A Hugging Face LLM path (``model.layers…``, GPT-2's ``transformer.h…``) is none.
    """
    head, _, rest = path.partition(".")
    if prefixed and head in DIFFUSION_COMPONENTS and rest:
        return head, rest
    if hint in DIFFUSION_COMPONENTS:
        return hint, path
    if head in _UNET_ROOTS:
        return "unet", path
    if head in _DIT_ROOTS:
        return "transformer", path
    if head == "text_model":
        return "text_encoder", path
    return None, path


def kohya_name(component: str, path: str, *, text_encoder_prefix: str = "lora_te_") -> str:
    """The sd-scripts name of a module at ``path`` inside ``component``: ``lora_unet_down_blocks_0_…``.

    ``text_encoder`` is ``lora_te_`` for SD1.x/2.x and ``lora_te1_`` beside a second text encoder
    (SDXL) or a DiT (Flux, SD3), as sd-scripts names them; ``text_encoder_2`` → ``lora_te2_``,
    ``text_encoder_3`` → ``lora_te3_``, ``transformer`` → ``lora_transformer_``.
    """
    prefix = {"unet": "lora_unet_", "text_encoder": text_encoder_prefix, "text_encoder_2": "lora_te2_",
              "text_encoder_3": "lora_te3_", "transformer": "lora_transformer_"}.get(component)
    if prefix is None:
        raise KeyMatchError(f"'{path}': no kohya name for component '{component}'; expected one of "
                            f"{list(DIFFUSION_COMPONENTS)}.")
    return prefix + path.replace(".", "_")


# --- Generic factor pairing (research state dicts) ---------------------------------------------

#: Pairs of tokens that name the two factors of one update, first the one applied to the input.
PAIR_TOKENS = (("lora_A", "lora_B"), ("lora_a", "lora_b"), ("lora_down", "lora_up"), ("down", "up"),
               ("w_a", "w_b"), ("A", "B"))
#: Tokens so common in module names that only dots may delimit them.
_DOT_ONLY_TOKENS = {"down", "up", "A", "B"}


def split_pair_token(key: str) -> tuple[str, str, int] | None:
    """``(module stem, token, side)`` when ``key`` contains a known factor token; side 0 = input factor.

    The token must stand between separators (``.``, ``_``, ``:`` or an end; ``down``/``up``/``A``/``B``
    between ``.`` or ``:`` only):
    ``blocks.0.attn.lora_A.weight`` → ``("blocks.0.attn", "lora_A", 0)``,
    ``w_b_003`` → ``("003", "w_b", 1)``. A trailing ``.weight`` and a
    ``.lora`` container are dropped from the stem.
    """
    body = key.removesuffix(".weight")
    for first, second in PAIR_TOKENS:
        for side, tok in enumerate((first, second)):
            sep = r"[.:]" if tok in _DOT_ONLY_TOKENS else r"[._:]"  # 'down_blocks' holds no factor token
            m = None
            for m in re.finditer(rf"(?:^|{sep}){re.escape(tok)}(?=$|{sep})", body):
                pass
            if m is None:
                continue
            start = m.start() + (1 if m.group(0)[0] in "._:" else 0)
            stem = (body[:start] + body[start + len(tok):]).strip("._:").replace("._", ".").replace("_.", ".")
            stem = re.sub(r"([.:_])[.:_]+", r"\1", stem) if "::" in stem or ":." in stem or ".:" in stem else stem
            stem = re.sub(r"\.lora$|^lora\.|\.lora(?=\.)", "", stem)
            return stem, f"{first}/{second}", side
    return None


# --- What a set of tensor names looks like -----------------------------------------------------

#: Tensor-name fragments of tuners that are not low-rank updates, with their names.
NOT_LOW_RANK = (
    ("oft_blocks", "OFT"), ("oft_diag", "OFT"), ("oft_r", "OFT"), ("boft_", "BOFT"), ("ia3_l", "IA3"),
    ("on_input", "IA3"), ("vera_lambda", "VeRA"), ("vera_A", "VeRA"), ("prompt_embeddings", "prompt tuning"),
    ("fourierft_spectrum", "FourierFT"), ("hra_u", "HRA"),
)


#: cloneofsimo/lora's ``save_safeloras_with_embeds`` keys: ``unet:12:up``, ``text_encoder:0:down``.
LORA_DIFFUSION_KEY = re.compile(r"^[^:.]+:\d+:(?:up|down)$")


def adapter_key_scheme(names: list[str]) -> str | None:
    """The adapter format a list of tensor names looks like, or None (a base checkpoint).

    Returns ``peft``, ``kohya``, ``lycoris``, ``diffusers``, ``mlx``, ``lora_diffusion``,
    ``state_dict`` (LoRA factor pairs under another naming), or
    ``not-low-rank:<tuner>``.
    """
    for fragment, tuner in NOT_LOW_RANK:
        if any(fragment in n for n in names):
            return f"not-low-rank:{tuner}"
    if any(LORA_DIFFUSION_KEY.match(n) for n in names):
        return "lora_diffusion"
    if any(n.startswith(tuple(p for p, _ in KOHYA_PREFIXES)) for n in names):
        if any(re.search(r"\.(hada_w1_a|lokr_w1|lokr_w1_a|lokr_w2|lokr_w2_a)$", n) for n in names):
            return "lycoris"
        if any(n.endswith((".lora_down.weight", ".lora_up.weight")) for n in names):
            return "kohya"
    if any(re.search(r"\.(hada_w1_a|lokr_w1|lokr_w1_a)$", n) for n in names):
        return "lycoris"
    if any(n.endswith((".lora.down.weight", ".lora.up.weight", "_lora.down.weight", "_lora.up.weight"))
           or ".lora_linear_layer." in n for n in names):
        return "diffusers"
    if any(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in names):
        if all(n.startswith(PEFT_PREFIX) for n in names if "lora_" in n):
            return "peft"
        if any(n.startswith(("unet.", "transformer.", "text_encoder.", "text_encoder_2.")) for n in names):
            return "diffusers"
    if any(n.endswith((".lora_a", ".lora_b")) for n in names) and not any(".lora_a." in n for n in names):
        return "mlx"
    paired = [n for n in names if split_pair_token(n) is not None and _looks_like_factor(n)]
    if len(paired) >= 2:
        return "state_dict"
    return None


def _looks_like_factor(name: str) -> bool:
    """A name whose pair token is a LoRA-ish one (``down``/``up``/``A``/``B`` alone are too common in bases)."""
    return bool(re.search(r"(?:^|[._])(lora[._]?[AaBb]|lora_down|lora_up|w_[ab])(?=$|[._])", name)) or (
        "lora" in name.lower() and split_pair_token(name) is not None)
