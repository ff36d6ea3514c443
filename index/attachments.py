"""Reading the checksummed attachments of a loaded index version (descriptor.pt, proxy.pt, catalog.csv, ...).

An index directory's live links follow the newest version, which a concurrent save may replace between a
load and a read; these functions read the files of exactly the version that was loaded, and check each
against the checksum its manifest recorded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping, Optional

from .errors import IndexCorruptError
from .layout import KNOWN_ATTACHMENTS


def attachment_path(
    name: str, directory: Optional[Path], version_dir: Optional[Path], checksums: Mapping[str, str]
) -> Path:
    """Path of attachment ``name`` of the version in ``version_dir`` (else the live one of ``directory``).

    ``directory / name`` follows the live version; this path stays with the loaded manifest (until a later
    save deletes that version: then load again).

    Raises:
        ValueError: ``name`` is not one of ``KNOWN_ATTACHMENTS``.
        FileNotFoundError: the index was not loaded from disk, or has no such attachment.
    """
    if name not in KNOWN_ATTACHMENTS:
        raise ValueError(f"attachment name {name!r} is not one of {sorted(KNOWN_ATTACHMENTS)}")
    if directory is None:
        raise FileNotFoundError(f"this index was never saved or loaded, so it has no attachment {name}")
    if version_dir is not None and name not in checksums:
        raise FileNotFoundError(f"the index at {directory} has no {name}: rebuild it with `street2shop index`")
    return (version_dir if version_dir is not None else directory) / name


def read_attachment(
    name: str, directory: Optional[Path], version_dir: Optional[Path], checksums: Mapping[str, str]
) -> bytes:
    """The bytes of attachment ``name`` (see `attachment_path`), checked against its manifest checksum.

    Raises:
        FileNotFoundError: no such attachment.
        IndexCorruptError: the file no longer matches the checksum verified at load time.
    """
    path = attachment_path(name, directory, version_dir, checksums)
    payload = path.read_bytes()
    expected = checksums.get(name)
    if expected is not None and hashlib.sha256(payload).hexdigest() != expected:
        raise IndexCorruptError(f"{path} does not match its checksum in the manifest: rebuild the index")
    return payload
