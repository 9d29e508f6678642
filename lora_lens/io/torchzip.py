"""Check a ``torch.save`` zip archive before ``torch.load`` reads it.

Since PyTorch 1.6, ``torch.save`` writes a zip of *stored* (uncompressed)
entries: ``<prefix>/data.pkl`` (the pickle) and one ``<prefix>/data/<k>``
record per storage. Before torch allocates anything, the central directory is
checked against the file: every entry stored, its data inside the file, and
the entries' sizes summing to at most the file size — so an entry claiming
10 GB in a 1 kB file is refused without reading it. (Torch itself checks each
storage's byte count against its record, and tensor views against their
storage.) Raw pickles and the legacy pre-1.6 format are refused: their
storage sizes are only known while unpickling, which would allocate them.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from ..errors import CheckpointError, UnsafeFileError
from .files import require_regular_file

_ZIP_MAGIC = b"PK\x03\x04"
#: A local file header is 30 bytes plus the name and extra field.
_LOCAL_HEADER = 30


def check_torch_zip(path: Path) -> None:
    """Refuse anything but a well-formed ``torch.save`` zip whose entries fit in the file."""
    size = require_regular_file(path, "a PyTorch state dict (.bin/.pt)").st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _ZIP_MAGIC:
        raise UnsafeFileError(
            f"{path}: refused: not a zip-format torch.save file (a raw pickle or the legacy pre-1.6 format), whose "
            "sizes cannot be checked before they are allocated. lora_lens never runs such files; re-save it with "
            "torch.save in PyTorch ≥ 1.6, or better as safetensors, with trusted code."
        )
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:  # e.g. 'zip file version 10.9'
        raise CheckpointError(f"{path}: not a readable PyTorch zip archive ({e}); it may be truncated. "
                              "Re-save it, preferably as safetensors.") from None
    total = 0
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED or i.compress_size != i.file_size:
            raise CheckpointError(f"{path}: entry '{i.filename}' is compressed; torch.save writes stored entries. "
                                  "The file was repacked or is not a PyTorch checkpoint: re-save it.")
        end = i.header_offset + _LOCAL_HEADER + len(i.filename.encode()) + i.file_size
        if end > size:
            raise CheckpointError(f"{path}: entry '{i.filename}' claims {i.file_size:,} bytes ending at byte {end:,} "
                                  f"but the file has {size:,}; it is truncated or damaged. Re-download it.")
        total += i.file_size
    if total > size:
        raise CheckpointError(f"{path}: entries claim {total:,} bytes in a file of {size:,}; the archive is damaged.")
    if not any(i.filename.endswith("data.pkl") for i in infos):
        raise CheckpointError(f"{path}: a zip without 'data.pkl'; expected a torch.save state dict.")
