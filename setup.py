"""The package list, which pyproject.toml cannot express (everything else is there).

``lora_lens`` and its sub-packages, found on disk, and ``lora_lens_cli``, built
from the ``cli/`` folder (``package-dir`` in pyproject.toml).
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["lora_lens", "lora_lens.*"]), "lora_lens_cli"])
