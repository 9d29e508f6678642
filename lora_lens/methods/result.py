"""What an init writes about itself: the result record and the provenance in its tensor files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..io.initfile import InitDescription
from ..jsonable import stamp, to_jsonable


def provenance(method: str, params: dict, sources: Sequence[str | Path]) -> dict[str, str]:
    """Safetensors metadata for an init file: method, params, sources, version."""
    return {
        "method": method,
        "params": json.dumps(params, sort_keys=True, default=str),
        "sources": json.dumps([str(s) for s in sources]),
        "lora_lens_version": __version__,
    }


@dataclass(frozen=True)
class InitResult:
    """What an init wrote: the folder, its description, and one record per module (type)."""

    out_dir: Path
    description: InitDescription
    records: tuple[dict, ...] = ()
    summary: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        # reshaped: the description is written under the name of the file it mirrors ("init")
        return stamp("init", {"out_dir": str(self.out_dir), "init": to_jsonable(self.description),
                              "summary": self.summary, "records": list(self.records)})
