"""The names inside a saved index directory and the small crash-safe steps that change it.

Shared by a save (``index.storage``, which describes the whole layout and the save protocol) and the
adoption of a format-1 flat index (``index.format1``). Every step here either is atomic (a rename) or
leaves nothing a reader follows until it is complete; :func:`crash_point` marks the gaps between steps.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path

INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
IVF_DATA_FILE = "index.ivfdata"
REFINE_FILE = "refine.faiss"
INDEX_DATA_FILES = (IVF_DATA_FILE, REFINE_FILE)
"""The files an index of the on-disk layout (``index.ondisk``) keeps beside ``index.faiss``: the merged
inverted lists and the re-rank vectors, both memory-mapped on load. No other index file is written."""
KNOWN_ATTACHMENTS = frozenset({"descriptor.pt", "local_features.npz", "proxy.pt", "catalog.csv", "query_bank.npz"})
"""The files the engine keeps beside an index; no other name is written, read or deleted, so a
manifest cannot make us touch arbitrary files. (descriptor.pt: the descriptor's weights and fitted state;
local_features.npz: the catalog's local features for re-ranking; proxy.pt: the proxy's trained weights;
catalog.csv: product id -> image of every product; query_bank.npz: the query bank and the catalog's
offsets of query-bank normalisation, ``index.bank_norm``.)"""

OBJECTS_DIR = "images"
"""A content-addressed store beside the versions: ``<dir>/images/<sha256>.<ext>``, files named by the
sha256 of their bytes, written once and never changed, so every version may refer to them (see
``index.storage.store_object``). It holds product photos that were handed over as bytes or arrays."""

CURRENT = "current"
LOCK_FILE = ".lock"
VERSION_PREFIX = ".v-"
TMP_PREFIX = ".tmp-"  # pointer symlinks being staged
LINKED = (INDEX_FILE, MANIFEST_FILE) + INDEX_DATA_FILES + tuple(sorted(KNOWN_ATTACHMENTS))
VERSION_NAME = re.compile(r"^\.v-[0-9a-f]+-[0-9a-f]+$")

SAVE_STEPS = (
    "locked",
    "cleaned",
    "flat-adopted",
    "flat-pointed",
    "flat-replaced",
    "index-written",
    "attachments-written",
    "manifest-written",
    "version-synced",
    "links-added",
    "pointer-staged",
    "pointer-swapped",
    "links-pruned",
    "done",
)
"""Names passed to :func:`_crash_point` during a save, in order. The ``flat-*`` steps happen only when
saving over a format-1 flat index (``flat-replaced`` once per file of it)."""


def _crash_point(step: str) -> None:
    """No-op hook between the steps of a save; tests replace it to kill the process at ``step``."""


def crash_point(step: str) -> None:
    """Call :func:`_crash_point` with ``step``, looked up on every call, so that a test that replaces
    ``layout._crash_point`` reaches the steps of every module a save runs through."""
    _crash_point(step)


def swap_pointer(target: Path, version_name: str) -> None:
    """Rename a fresh ``current -> version_name`` symlink over the old one: THE atomic step."""
    staged = target / f"{TMP_PREFIX}{secrets.token_hex(8)}"
    os.symlink(version_name, staged)
    crash_point("pointer-staged")
    os.replace(staged, target / CURRENT)
    fsync_path(target)


def ensure_link(target: Path, name: str) -> None:
    """``<target>/<name> -> current/<name>``, replacing a plain file of ours in one rename."""
    if is_our_link(target, name):
        return
    staged = target / f"{TMP_PREFIX}{secrets.token_hex(8)}"
    os.symlink(f"{CURRENT}/{name}", staged)
    os.replace(staged, target / name)


def new_version_name() -> str:
    return f"{VERSION_PREFIX}{time.time_ns():x}-{secrets.token_hex(4)}"


def new_version_dir(target: Path) -> Path:
    while True:
        version = target / new_version_name()
        try:
            version.mkdir(mode=0o777)  # the umask applies, unlike tempfile.mkdtemp's 0700
            return version
        except FileExistsError:
            continue


def is_our_link(target: Path, name: str) -> bool:
    try:
        return os.readlink(target / name) == f"{CURRENT}/{name}"
    except OSError:
        return False


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its renames and new entries durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
