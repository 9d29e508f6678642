"""Injection: find the target modules of any ``nn.Module`` and wrap them in adapter layers.

Targets are matched like PEFT's ``target_modules`` list: a module path matches
a target when it equals it or ends with ``"." + target`` (``q_proj`` matches
``model.layers.0.self_attn.q_proj``; ``self_attn.q_proj`` works too). Only
``nn.Linear`` and GPT-2's ``Conv1D`` (duck-typed, so transformers is not
imported) can be wrapped. The wrapped module keeps its path, so the names
written to the PEFT adapter are the model's own ``named_modules`` paths.
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from ..errors import ConfigError
from ..keys import parse_module_path
from .layers import is_conv1d

#: Tried in order when no targets are given: the first set that matches wins.
DEFAULT_TARGETS = (("q_proj", "v_proj"), ("query", "value"), ("c_attn",), ("q_lin", "v_lin"))


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def find_targets(model: nn.Module, targets: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """``[(path, module)]`` of the modules to adapt, in ``named_modules`` order.

    ``targets=None`` picks the first of :data:`DEFAULT_TARGETS` present.
    Every target that matches nothing, and every match that is not a Linear or
    Conv1D, is reported in one error.
    """
    named = [(p, m) for p, m in model.named_modules() if p]
    if targets is None:
        for candidate in DEFAULT_TARGETS:
            if any(_matches(p, t) and is_adaptable(m) for p, m in named for t in candidate):
                targets = candidate
                break
        else:
            raise ConfigError(
                f"no default target modules ({[list(t) for t in DEFAULT_TARGETS]}) in this model; "
                f"name them with --targets (adaptable modules: {_adaptable_types(named)})."
            )
    found = [(p, m) for p, m in named if any(_matches(p, t) for t in targets)]
    unmatched = [t for t in targets if not any(_matches(p, t) for p, _ in found)]
    wrong = [f"{p} ({type(m).__name__})" for p, m in found if not is_adaptable(m)]
    problems = []
    if unmatched:
        problems.append(f"target(s) {unmatched} match no module")
    if wrong:
        problems.append(f"target(s) match modules that are not Linear/Conv1D: {wrong[:4]}")
    if problems:
        raise ConfigError(
            "; ".join(problems) + f". Adaptable module types in this model: {_adaptable_types(named)}; "
            "pass them with --targets."
        )
    return found


def _adaptable_types(named: list[tuple[str, nn.Module]]) -> list[str]:
    return list(dict.fromkeys(parse_module_path(p).module for p, m in named if is_adaptable(m)))[:12]


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def inject(
    model: nn.Module, targets: list[tuple[str, nn.Module]], wrap: Callable[[str, nn.Module], nn.Module]
) -> dict[str, nn.Module]:
    """Freeze every parameter of ``model`` and replace each target by ``wrap(path, module)``.

    Returns ``{path: adapter layer}`` in target order. Mutates ``model``
    (the trainer works on its own copy).
    """
    model.requires_grad_(False)
    layers = {}
    for path, module in targets:
        layer = wrap(path, module)
        replace_module(model, path, layer)
        layers[path] = layer
    return layers
