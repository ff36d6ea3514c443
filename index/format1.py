"""Format 1, the flat layout of earlier street2shop versions: still read, adopted on the next save.

A format-1 index is ``index.faiss`` and ``manifest.json`` (and the attachments that manifest lists) as
plain files in ``<dir>``, without a ``current`` pointer; its writer replaced a whole directory with two
renames and left hidden ``.<name>.old-*`` / ``.<name>.tmp-*`` siblings when killed between them. Here:
which plain files are ours, putting back an index such a crash left aside, removing those siblings, and
turning a flat index into a version folder before a save (see ``index.storage``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Dict, Set

from .layout import (
    CURRENT,
    INDEX_FILE,
    KNOWN_ATTACHMENTS,
    MANIFEST_FILE,
    crash_point,
    ensure_link,
    fsync_path,
    new_version_dir,
    new_version_name,
    swap_pointer,
)

LOGGER = logging.getLogger("street2shop.index")


def adopt_flat(target: Path) -> None:
    """Turn a format-1 flat index in ``target`` into a version folder, unchanged, before a save.

    Its files are hard-linked (copied where links fail) into a new version folder, ``current`` is
    pointed at it, then each top-level file is replaced by our link, the manifest last (while it is a
    plain file it names which other plain files are ours). Every top-level name keeps the same bytes
    throughout, so a crash at any step leaves the old index loadable, whichever layout a reader sees.
    A dereferencing copy (``current`` a folder, top-level files plain copies of it) is adopted the same
    way, with that folder as the version.
    """
    flat = flat_files(target)
    current = target / CURRENT
    if not current.is_symlink():
        if current.is_dir():
            version = target / new_version_name()
            os.rename(current, version)  # readers meanwhile read the identical top-level copies
        elif flat:
            version = new_version_dir(target)
            for name in sorted(flat):
                _link_or_copy(target / name, version / name)
            fsync_path(version)
        else:
            return
        fsync_path(target)
        crash_point("flat-adopted")
        swap_pointer(target, version.name)
        crash_point("flat-pointed")
    # A pointer already there with plain files left: a crash interrupted this loop last time.
    for name in sorted(flat, key=lambda name: name == MANIFEST_FILE):
        ensure_link(target, name)
        fsync_path(target)
        crash_point("flat-replaced")


def flat_files(target: Path) -> Set[str]:
    """Plain files of a format-1 index in ``target``: index.faiss, manifest.json and the attachments
    that manifest lists. Empty once manifest.json is one of our links."""
    manifest_path = target / MANIFEST_FILE
    if manifest_path.is_symlink() or not manifest_path.is_file():
        return set()
    listed: Set[str] = set()
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            attachments = json.load(handle).get("attachments", {})
        listed = {name for name in attachments if name in KNOWN_ATTACHMENTS}
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # unreadable: only index.faiss and manifest.json count as ours
    return {
        name
        for name in {INDEX_FILE, MANIFEST_FILE} | listed
        if (target / name).is_file() and not (target / name).is_symlink()
    }


def legacy_siblings(target: Path) -> Dict[str, list]:
    """Hidden siblings left by the format-1 writer: ``.<name>.old-*`` (the previous index, set aside
    by an overwrite) and ``.<name>.tmp-*`` (staging), as made by tempfile.mkdtemp."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(old|tmp)-[a-z0-9_]{{8}}$")
    found: Dict[str, list] = {"old": [], "tmp": []}
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return found
    for entry in entries:
        match = pattern.match(entry.name)
        if match and entry.is_dir(follow_symlinks=False):
            found[match.group(1)].append(Path(entry.path))
    return found


def recover_legacy(target: Path) -> None:
    """The format-1 writer, killed between its two renames, left no index but the old one aside as
    ``.<name>.old-*``: put it back (the newest, if several), so it loads."""
    if os.path.lexists(target):
        return
    olds = [
        path
        for path in legacy_siblings(target)["old"]
        if (path / MANIFEST_FILE).is_file() and (path / INDEX_FILE).is_file()
    ]
    if not olds:
        return
    newest = max(olds, key=lambda path: path.stat().st_mtime)
    try:
        os.rename(newest, target)
    except OSError:
        return  # someone else restored or created it first
    fsync_path(target.parent)
    LOGGER.warning("restored the index at %s that an interrupted save had left aside as %s", target, newest.name)


def remove_legacy_siblings(target: Path) -> None:
    for paths in legacy_siblings(target).values():
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)  # no copy of a multi-GB index
    except OSError:
        shutil.copyfile(source, destination)
        fsync_path(destination)
