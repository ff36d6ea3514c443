"""On-disk layout of a saved index: versioned, checksummed, swapped in one atomic step, locked.

A saved index is a real, stable directory::

    <dir>/.lock                      flock(2) target: one writer at a time (never deleted)
    <dir>/current -> .v-<id>         relative symlink naming the live version: THE pointer
    <dir>/.v-<id>/index.faiss        faiss.write_index of a CPU index
    <dir>/.v-<id>/manifest.json      format_version, preset, factory_string, metric, dim, ntotal,
                                     product_ids (FAISS label order), search_params, metadata,
                                     checksum (sha256 of index.faiss), attachments (name -> sha256),
                                     manifest_checksum (sha256 of the manifest's canonical JSON)
    <dir>/.v-<id>/descriptor.pt ...  attachments (only names in KNOWN_ATTACHMENTS)
    <dir>/.v-<id>/index.ivfdata      the on-disk layout only (``index.ondisk``): the merged inverted
    <dir>/.v-<id>/refine.faiss       lists and the re-rank vectors, memory-mapped on load; checksummed
                                     in the manifest's index_files, index.faiss then holds the IVF
    <dir>/.v-<id>/shard-0001.faiss   the separate-shard layout only (``index.shards``): shards 1..N-1
                                     (index.faiss is shard 0), checksummed in index_files, never linked
    <dir>/index.faiss -> current/index.faiss      stable relative links, so that ``<dir>/<name>``
    <dir>/manifest.json -> current/manifest.json  keeps naming the live file for callers that
    <dir>/descriptor.pt -> current/descriptor.pt  open it by path (the engine does)
    <dir>/images/<sha256>.<ext>      content-addressed files (``store_object``): written once, shared by
                                     every version, named by the sha256 of their bytes

A save writes and fsyncs a complete ``.v-<id>`` folder, then renames a fresh symlink over
``current`` (rename(2) is atomic), then deletes older versions. At every instant ``current`` names a
complete version, so a crash at any point leaves the old or the new index loadable, and readers never
see a missing index: a reader pins the version ``current`` names and, if a writer deletes it under
it, reads the pointer again. Every name is relative, so ``cp -r`` / ``rsync -a`` copies load.

The flat layout of format 1 (``index.faiss`` and ``manifest.json`` as plain files in ``<dir>``)
still loads. A save over it first adopts those files, unchanged, as a version folder (hard links),
then proceeds as over any versioned index; it touches only the files that manifest lists.

This module holds the protocol: the lock, a save (write a version, publish it), reads that pin one
version, and tidying what crashed saves left. The names and the primitive steps (pointer swap, links,
the ``_crash_point`` hook between steps) are in ``index.layout``, the manifest and the checks a load
runs in ``index.manifest``, format 1 in ``index.format1``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Set, Tuple

import faiss

from .errors import IndexCorruptError, IndexLockedError
from .format1 import adopt_flat, flat_files, legacy_siblings, recover_legacy, remove_legacy_siblings
from .layout import (
    CURRENT,
    INDEX_DATA_FILES,
    INDEX_FILE,
    LINKED,
    LOCK_FILE,
    MANIFEST_FILE,
    OBJECTS_DIR,
    TMP_PREFIX,
    VERSION_NAME,
    VERSION_PREFIX,
    crash_point,
    ensure_link,
    fsync_path,
    is_our_link,
    new_version_dir,
    swap_pointer,
)
from .manifest import (
    check_metadata,
    checked_attachments,
    checksummed_manifest,
    read_version,
    sha256_file,
)
from .ondisk import ONDISK_LAYOUT, write_ondisk_files
from .shards import SEPARATE_LAYOUT, write_separate_files

LOGGER = logging.getLogger("street2shop.index")

_READ_ATTEMPTS = 50  # a reader racing a writer that saves in a tight loop re-reads the pointer this often

DEFAULT_LOCK_TIMEOUT_S = 300.0
"""How long a save waits for another save of the same directory before giving up."""


def check_index_destination(directory: str | os.PathLike) -> Path:
    """Refuse, before any expensive work, a destination a save would have to refuse later.

    A symlink is followed: the index is written into its target and the link stays a link.

    Returns:
        The real directory a save will write into (it may not exist yet).

    Raises:
        FileExistsError: the path exists and is not a directory, or holds files that are not part of
            a saved index (a user's notes.txt): we never replace or delete someone else's files.
        NotADirectoryError: a parent of the path is a file.
    """
    target = Path(os.path.realpath(directory))
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory: choose a new or empty directory")
    if not target.exists():
        parent = target.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise NotADirectoryError(f"cannot create {directory}: {parent} is a file, not a directory")
        return target
    foreign = _foreign_entries(target)
    if foreign:
        raise FileExistsError(
            f"{directory} holds files that are not part of a saved index ({', '.join(foreign[:5])}): "
            "choose an empty or new directory, or move those files away"
        )
    return target


def write_index_dir(
    directory: str | os.PathLike,
    cpu_index: Any,
    manifest: Dict[str, Any],
    attachments: Optional[Mapping[str, bytes]] = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
) -> Path:
    """Write ``cpu_index``, ``manifest`` (checksums filled in here) and ``attachments`` as the new live
    version of ``directory``, in one atomic step, holding the directory's lock.

    Attachments are files the caller keeps beside the index (the engine stores the descriptor's fitted
    state there); they change together with the index and their sha256 is checked on load.

    Returns:
        The real directory written (``directory`` with symlinks resolved).

    Raises:
        ValueError: an attachment name outside ``KNOWN_ATTACHMENTS``, or a metadata ``descriptor``
            naming a checkpoint (``name@path``).
        FileExistsError: see :func:`check_index_destination`.
        IndexLockedError: another save of ``directory`` held its lock for ``lock_timeout`` seconds.
    """
    payloads = checked_attachments(attachments)
    check_metadata(manifest.get("metadata"), ValueError, "the index metadata")
    recover_legacy(Path(os.path.realpath(directory)))
    target = check_index_destination(directory)
    _make_directory(target)
    with _exclusive_lock(target, lock_timeout):
        crash_point("locked")
        check_index_destination(target)  # again: files may have appeared while we waited
        _remove_leftovers(target)
        crash_point("cleaned")
        adopt_flat(target)
        version = new_version_dir(target)
        try:
            attached = _write_version(version, cpu_index, manifest, payloads)
        except BaseException:
            shutil.rmtree(version, ignore_errors=True)
            raise
        # Shard files (index.shards) get no top-level link: they are read through the version folder only.
        _publish(target, version.name, {INDEX_FILE, MANIFEST_FILE} | (set(attached) & set(LINKED)))
        _remove_leftovers(target)
        crash_point("done")
    return target


def read_index_dir(directory: str | os.PathLike) -> Tuple[Any, Dict[str, Any]]:
    """Read and verify the live index of ``directory`` (see :func:`load_index_dir`): ``(cpu_index, manifest)``."""
    cpu_index, manifest, _ = load_index_dir(directory)
    return cpu_index, manifest


def load_index_dir(directory: str | os.PathLike) -> Tuple[Any, Dict[str, Any], Path]:
    """Read and verify the live index of a directory written by :func:`write_index_dir` (or format 1).

    Returns:
        ``(cpu_index, manifest, version_dir)``: the manifest has been checked (its own checksum, the
        index checksum, format version, dim, ntotal, ids, attachment names and checksums);
        ``version_dir`` is the folder the files were read from (it holds the attachments of exactly
        this version until a later save deletes it).

    Raises:
        FileNotFoundError: no saved index at ``directory``, or one of its files is missing.
        IndexCorruptError: any checksum mismatch, unreadable or inconsistent manifest.
        ValueError: the index was written by a newer format than this code reads.
    """
    directory = Path(directory)
    if not directory.exists():
        recover_legacy(Path(os.path.realpath(directory)))
    for attempt in range(_READ_ATTEMPTS):
        token, version_dir = _live_version(directory)
        try:
            cpu_index, manifest = read_version(version_dir)
        except (FileNotFoundError, IndexCorruptError):
            # A writer swapped versions (and deleted ours) while we read: read the new one instead.
            if attempt + 1 < _READ_ATTEMPTS and _pointer_or_none(directory) != token:
                time.sleep(0.001 * attempt)
                continue
            raise
        _tidy_after_load(directory, token)
        return cpu_index, manifest, version_dir
    raise AssertionError("unreachable")  # the last attempt returns or raises


_OBJECT_SUFFIX = re.compile(r"^\.[a-z0-9]{1,8}$")


def store_object(directory: str | os.PathLike, payload: bytes, suffix: str) -> str:
    """Keep ``payload`` in the content-addressed store of an index directory; return its name relative to
    ``directory`` (``images/<sha256><suffix>``), what a manifest or attachment refers to it by.

    Written atomically (a temporary file renamed into place) and only once: the same bytes stored twice
    are one file. Objects outlive versions (an old version may still refer to them), so a save never
    deletes them; a load can check one with :func:`read_object`.

    Raises:
        ValueError: a suffix that is not a short lowercase extension such as ``.png``.
        FileExistsError: see :func:`check_index_destination`.
    """
    if not _OBJECT_SUFFIX.match(suffix):
        raise ValueError(f"object suffix must look like '.png' (lowercase letters or digits), got {suffix!r}")
    target = check_index_destination(directory)
    store = target / OBJECTS_DIR
    _make_directory(store)
    name = hashlib.sha256(payload).hexdigest() + suffix
    path = store / name
    if not path.exists():
        staged = store / f"{TMP_PREFIX}{secrets.token_hex(8)}"
        try:
            _write_file(staged, payload)
            os.replace(staged, path)
        finally:
            if staged.exists():
                staged.unlink()
        fsync_path(store)
    return f"{OBJECTS_DIR}/{name}"


def read_object(directory: str | os.PathLike, name: str) -> bytes:
    """The bytes of object ``name`` (as :func:`store_object` returned it), checked against its sha256 name.

    Raises:
        ValueError: a name that is not ``images/<sha256><suffix>`` (no other path is ever read).
        FileNotFoundError: no such object.
        IndexCorruptError: the file no longer has the content its name says.
    """
    path = object_path(directory, name)
    payload = path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != path.name.split(".")[0]:
        raise IndexCorruptError(f"{path} does not match the sha256 in its name: the file was damaged or replaced")
    return payload


def object_path(directory: str | os.PathLike, name: str) -> Path:
    """Path of object ``name`` inside ``directory``; refuses any name but ``images/<sha256><suffix>``."""
    folder, _, file_name = str(name).partition("/")
    stem, dot, suffix = file_name.partition(".")
    if folder != OBJECTS_DIR or not re.fullmatch(r"[0-9a-f]{64}", stem) or not _OBJECT_SUFFIX.match(dot + suffix):
        raise ValueError(f"{name!r} is not an object name of an index (images/<sha256>.<ext>)")
    return Path(directory) / OBJECTS_DIR / file_name


def live_version_dir(directory: str | os.PathLike) -> Path:
    """The folder holding the live ``index.faiss`` and ``manifest.json`` of ``directory`` (the
    directory itself for a format-1 flat index). Raises FileNotFoundError if there is none."""
    return _live_version(Path(directory))[1]


# ------------------------------------------------------------------------------------ writing
def _write_version(
    version: Path, cpu_index: Any, manifest: Dict[str, Any], payloads: Mapping[str, bytes]
) -> Dict[str, str]:
    """Write and fsync every file of a version folder; returns the sha256 by name of every file but the
    index and the manifest (the attachments, and the on-disk layout's files)."""
    index_path = version / INDEX_FILE
    index_files = {}
    kind = manifest.get("layout", {}).get("kind")
    if kind == ONDISK_LAYOUT:
        write_ondisk_files(version, cpu_index)
        index_files = {name: sha256_file(version / name) for name in INDEX_DATA_FILES}
    elif kind == SEPARATE_LAYOUT:
        index_files = {name: sha256_file(version / name) for name in write_separate_files(version, cpu_index)}
    else:
        faiss.write_index(cpu_index, str(index_path))
        fsync_path(index_path)
    crash_point("index-written")
    attached = {}
    for name, payload in sorted(payloads.items()):
        _write_file(version / name, payload)
        attached[name] = hashlib.sha256(payload).hexdigest()
    crash_point("attachments-written")
    manifest = checksummed_manifest(manifest, sha256_file(index_path), attached, index_files)
    _write_file(version / MANIFEST_FILE, json.dumps(manifest, indent=1).encode("utf-8"))
    crash_point("manifest-written")
    fsync_path(version)
    fsync_path(version.parent)  # the version folder's own entry
    crash_point("version-synced")
    return {**attached, **index_files}


def _publish(target: Path, version_name: str, names: Set[str]) -> None:
    """Make ``version_name`` live: top-level links, then the pointer swap, then prune unused links."""
    for name in sorted(names):
        ensure_link(target, name)  # dangling until the swap if the old version lacks that file
    fsync_path(target)
    crash_point("links-added")
    swap_pointer(target, version_name)
    crash_point("pointer-swapped")
    for name in LINKED:
        if name not in names and is_our_link(target, name):
            os.unlink(target / name)
    fsync_path(target)
    crash_point("links-pruned")


def _make_directory(target: Path) -> None:
    """mkdir -p with the umask's modes, fsyncing each parent whose listing changed."""
    missing = []
    path = target
    while not path.exists():
        missing.append(path)
        path = path.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o777)
        except FileExistsError:
            continue
        fsync_path(path.parent)


def _write_file(path: Path, payload: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def _exclusive_lock(target: Path, timeout: float) -> Iterator[None]:
    """flock ``<target>/.lock``, polling up to ``timeout`` seconds; released on exit or process death."""
    descriptor = os.open(target / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise IndexLockedError(
                        f"{target} is being saved by another process (it held {target / LOCK_FILE} for "
                        f"over {timeout:.0f} s): wait for that save to finish, or save elsewhere"
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


# ------------------------------------------------------------------------------------ tidying
def _remove_leftovers(target: Path) -> None:
    """Delete every version but the live one and every staged pointer (call holding the lock)."""
    live = _pointer_or_none(target)
    for entry in os.scandir(target):
        if entry.name == live:
            continue
        if entry.name.startswith(VERSION_PREFIX) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        elif entry.name.startswith(TMP_PREFIX) and entry.is_symlink():
            os.unlink(entry.path)
    remove_legacy_siblings(target)
    fsync_path(target)


def _tidy_after_load(directory: Path, live: Optional[str]) -> None:
    """After a load, delete what a crashed save left, if no save is running (never waits)."""
    if live is None:
        return  # a format-1 index has no lock file: its next save tidies up
    target = Path(os.path.realpath(directory))
    try:
        stale = [
            name
            for name in os.listdir(target)
            if (name.startswith(VERSION_PREFIX) and name != live) or name.startswith(TMP_PREFIX)
        ]
        if not stale and not any(legacy_siblings(target).values()):
            return
        descriptor = os.open(target / LOCK_FILE, os.O_RDWR)
    except OSError:
        return  # a read-only copy, or no lock file: leave it as it is
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _remove_leftovers(target)
    except OSError:
        pass  # a save holds the lock (it tidies up itself), or we may not write here
    finally:
        os.close(descriptor)


# ------------------------------------------------------------------------------------ reading
def _pointer_or_none(directory: Path) -> Optional[str]:
    """The version name ``current`` points at; None when there is no pointer (format 1, or nothing)."""
    try:
        return os.readlink(Path(directory) / CURRENT)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.EINVAL:  # a folder: a dereferencing copy
            return CURRENT
        raise


def _live_version(directory: Path) -> Tuple[Optional[str], Path]:
    """``(token, folder)`` of the live version; token is None for a format-1 flat index."""
    if not directory.is_dir():
        raise FileNotFoundError(f"no saved index at {directory}: build one with `street2shop index`")
    live = _pointer_or_none(directory)
    if live is None:
        manifest = directory / MANIFEST_FILE
        if manifest.is_file() and not manifest.is_symlink():
            return None, directory
        raise FileNotFoundError(
            f"no saved index at {directory} ({directory / CURRENT} and {manifest} are missing): "
            "build one with `street2shop index`"
        )
    if (live != CURRENT and not VERSION_NAME.match(live)) or (directory / live).is_symlink():
        raise IndexCorruptError(
            f"{directory / CURRENT} points to {live!r}, not to a version folder of this index: rebuild the "
            "index with `street2shop index`"
        )
    return live, directory / live


# ------------------------------------------------------------------------------------ ownership
def _foreign_entries(target: Path) -> list:
    """Names in ``target`` that no save of ours made, sorted."""
    flat = flat_files(target)
    foreign = []
    for entry in os.scandir(target):
        name = entry.name
        if name == LOCK_FILE and entry.is_file(follow_symlinks=False):
            continue
        if name == CURRENT and (entry.is_symlink() or entry.is_dir()):
            continue
        if name == OBJECTS_DIR and entry.is_dir(follow_symlinks=False):
            continue
        if name.startswith(VERSION_PREFIX) and entry.is_dir(follow_symlinks=False):
            continue
        if name.startswith(TMP_PREFIX) and entry.is_symlink():
            continue
        if name in flat or (name in LINKED and is_our_link(target, name)):
            continue
        foreign.append(name)
    return sorted(foreign)
