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
    <dir>/index.faiss -> current/index.faiss      stable relative links, so that ``<dir>/<name>``
    <dir>/manifest.json -> current/manifest.json  keeps naming the live file for callers that
    <dir>/descriptor.pt -> current/descriptor.pt  open it by path (the engine does)

A save writes and fsyncs a complete ``.v-<id>`` folder, then renames a fresh symlink over
``current`` (rename(2) is atomic), then deletes older versions. At every instant ``current`` names a
complete version, so a crash at any point leaves the old or the new index loadable, and readers never
see a missing index: a reader pins the version ``current`` names and, if a writer deletes it under
it, reads the pointer again. Every name is relative, so ``cp -r`` / ``rsync -a`` copies load.

The flat layout of format 1 (``index.faiss`` and ``manifest.json`` as plain files in ``<dir>``)
still loads. A save over it first adopts those files, unchanged, as a version folder (hard links),
then proceeds as over any versioned index; it touches only the files that manifest lists.
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

LOGGER = logging.getLogger("street2shop.index")

FORMAT_VERSION = 2
"""2: versioned layout and a manifest checksum. 1: flat layout, only index.faiss checksummed."""

INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
KNOWN_ATTACHMENTS = frozenset({"descriptor.pt", "local_features.npz"})
"""The files the engine keeps beside an index; no other name is written, read or deleted, so a
manifest cannot make us touch arbitrary files."""

CURRENT = "current"
LOCK_FILE = ".lock"
VERSION_PREFIX = ".v-"
_TMP_PREFIX = ".tmp-"  # pointer symlinks being staged
_MANIFEST_CHECKSUM = "manifest_checksum"
_REQUIRED_KEYS = ("format_version", "factory_string", "dim", "ntotal", "product_ids", "checksum")
_LINKED = (INDEX_FILE, MANIFEST_FILE) + tuple(sorted(KNOWN_ATTACHMENTS))
_VERSION_NAME = re.compile(r"^\.v-[0-9a-f]+-[0-9a-f]+$")
_READ_ATTEMPTS = 50  # a reader racing a writer that saves in a tight loop re-reads the pointer this often

DEFAULT_LOCK_TIMEOUT_S = 300.0
"""How long a save waits for another save of the same directory before giving up."""

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


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB indexes do not need to fit in memory twice."""
    with open(path, "rb") as handle:
        return _sha256_handle(handle, chunk_bytes)


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, without its own ``manifest_checksum`` field.

    Canonical (sorted keys, no spaces, ASCII) so that it does not depend on how the file was indented.
    """
    body = {key: value for key, value in manifest.items() if key != _MANIFEST_CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


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
    payloads = _checked_attachments(attachments)
    _check_metadata(manifest.get("metadata"), ValueError, "the index metadata")
    _recover_legacy(Path(os.path.realpath(directory)))
    target = check_index_destination(directory)
    _make_directory(target)
    with _exclusive_lock(target, lock_timeout):
        _crash_point("locked")
        check_index_destination(target)  # again: files may have appeared while we waited
        _remove_leftovers(target)
        _crash_point("cleaned")
        _adopt_flat(target)
        version = _new_version_dir(target)
        try:
            attached = _write_version(version, cpu_index, manifest, payloads)
        except BaseException:
            shutil.rmtree(version, ignore_errors=True)
            raise
        _publish(target, version.name, {INDEX_FILE, MANIFEST_FILE} | set(attached))
        _remove_leftovers(target)
        _crash_point("done")
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
        _recover_legacy(Path(os.path.realpath(directory)))
    for attempt in range(_READ_ATTEMPTS):
        token, version_dir = _live_version(directory)
        try:
            cpu_index, manifest = _read_version(version_dir)
        except (FileNotFoundError, IndexCorruptError):
            # A writer swapped versions (and deleted ours) while we read: read the new one instead.
            if attempt + 1 < _READ_ATTEMPTS and _pointer_or_none(directory) != token:
                time.sleep(0.001 * attempt)
                continue
            raise
        _tidy_after_load(directory, token)
        return cpu_index, manifest, version_dir
    raise AssertionError("unreachable")  # the last attempt returns or raises


def live_version_dir(directory: str | os.PathLike) -> Path:
    """The folder holding the live ``index.faiss`` and ``manifest.json`` of ``directory`` (the
    directory itself for a format-1 flat index). Raises FileNotFoundError if there is none."""
    return _live_version(Path(directory))[1]


# ------------------------------------------------------------------------------------ writing
def _checked_attachments(attachments: Optional[Mapping[str, bytes]]) -> Dict[str, bytes]:
    payloads: Dict[str, bytes] = {}
    for name, payload in (attachments or {}).items():
        if name not in KNOWN_ATTACHMENTS:
            raise ValueError(
                f"attachment name {name!r} is not one of {sorted(KNOWN_ATTACHMENTS)}: an index keeps only "
                "those files beside it (add a name to index.storage.KNOWN_ATTACHMENTS to keep another)"
            )
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"attachment {name!r} must be bytes, got {type(payload).__name__}")
        payloads[name] = bytes(payload)
    return payloads


def _write_version(
    version: Path, cpu_index: Any, manifest: Dict[str, Any], payloads: Mapping[str, bytes]
) -> Dict[str, str]:
    """Write and fsync every file of a version folder; returns the attachments' sha256 by name."""
    index_path = version / INDEX_FILE
    faiss.write_index(cpu_index, str(index_path))
    _fsync_path(index_path)
    _crash_point("index-written")
    attached = {}
    for name, payload in sorted(payloads.items()):
        _write_file(version / name, payload)
        attached[name] = hashlib.sha256(payload).hexdigest()
    _crash_point("attachments-written")
    manifest = dict(manifest, format_version=FORMAT_VERSION, checksum=sha256_file(index_path), attachments=attached)
    manifest.pop(_MANIFEST_CHECKSUM, None)
    # Checksum what a reader will parse (e.g. int dict keys become strings), not the caller's objects.
    manifest = json.loads(json.dumps(manifest))
    manifest[_MANIFEST_CHECKSUM] = manifest_checksum(manifest)
    _write_file(version / MANIFEST_FILE, json.dumps(manifest, indent=1).encode("utf-8"))
    _crash_point("manifest-written")
    _fsync_path(version)
    _fsync_path(version.parent)  # the version folder's own entry
    _crash_point("version-synced")
    return attached


def _adopt_flat(target: Path) -> None:
    """Turn a format-1 flat index in ``target`` into a version folder, unchanged, before a save.

    Its files are hard-linked (copied where links fail) into a new version folder, ``current`` is
    pointed at it, then each top-level file is replaced by our link, the manifest last (while it is a
    plain file it names which other plain files are ours). Every top-level name keeps the same bytes
    throughout, so a crash at any step leaves the old index loadable, whichever layout a reader sees.
    A dereferencing copy (``current`` a folder, top-level files plain copies of it) is adopted the same
    way, with that folder as the version.
    """
    flat = _flat_files(target)
    current = target / CURRENT
    if not current.is_symlink():
        if current.is_dir():
            version = target / _new_version_name()
            os.rename(current, version)  # readers meanwhile read the identical top-level copies
        elif flat:
            version = _new_version_dir(target)
            for name in sorted(flat):
                _link_or_copy(target / name, version / name)
            _fsync_path(version)
        else:
            return
        _fsync_path(target)
        _crash_point("flat-adopted")
        _swap_pointer(target, version.name)
        _crash_point("flat-pointed")
    # A pointer already there with plain files left: a crash interrupted this loop last time.
    for name in sorted(flat, key=lambda name: name == MANIFEST_FILE):
        _ensure_link(target, name)
        _fsync_path(target)
        _crash_point("flat-replaced")


def _publish(target: Path, version_name: str, names: Set[str]) -> None:
    """Make ``version_name`` live: top-level links, then the pointer swap, then prune unused links."""
    for name in sorted(names):
        _ensure_link(target, name)  # dangling until the swap if the old version lacks that file
    _fsync_path(target)
    _crash_point("links-added")
    _swap_pointer(target, version_name)
    _crash_point("pointer-swapped")
    for name in _LINKED:
        if name not in names and _is_our_link(target, name):
            os.unlink(target / name)
    _fsync_path(target)
    _crash_point("links-pruned")


def _swap_pointer(target: Path, version_name: str) -> None:
    """Rename a fresh ``current -> version_name`` symlink over the old one: THE atomic step."""
    staged = target / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
    os.symlink(version_name, staged)
    _crash_point("pointer-staged")
    os.replace(staged, target / CURRENT)
    _fsync_path(target)


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)  # no copy of a multi-GB index
    except OSError:
        shutil.copyfile(source, destination)
        _fsync_path(destination)


def _ensure_link(target: Path, name: str) -> None:
    """``<target>/<name> -> current/<name>``, replacing a plain file of ours in one rename."""
    if _is_our_link(target, name):
        return
    staged = target / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
    os.symlink(f"{CURRENT}/{name}", staged)
    os.replace(staged, target / name)


def _new_version_name() -> str:
    return f"{VERSION_PREFIX}{time.time_ns():x}-{secrets.token_hex(4)}"


def _new_version_dir(target: Path) -> Path:
    while True:
        version = target / _new_version_name()
        try:
            version.mkdir(mode=0o777)  # the umask applies, unlike tempfile.mkdtemp's 0700
            return version
        except FileExistsError:
            continue


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
        _fsync_path(path.parent)


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
        elif entry.name.startswith(_TMP_PREFIX) and entry.is_symlink():
            os.unlink(entry.path)
    _remove_legacy_siblings(target)
    _fsync_path(target)


def _tidy_after_load(directory: Path, live: Optional[str]) -> None:
    """After a load, delete what a crashed save left, if no save is running (never waits)."""
    if live is None:
        return  # a format-1 index has no lock file: its next save tidies up
    target = Path(os.path.realpath(directory))
    try:
        stale = [
            name
            for name in os.listdir(target)
            if (name.startswith(VERSION_PREFIX) and name != live) or name.startswith(_TMP_PREFIX)
        ]
        if not stale and not any(_legacy_siblings(target).values()):
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


def _legacy_siblings(target: Path) -> Dict[str, list]:
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


def _recover_legacy(target: Path) -> None:
    """The format-1 writer, killed between its two renames, left no index but the old one aside as
    ``.<name>.old-*``: put it back (the newest, if several), so it loads."""
    if os.path.lexists(target):
        return
    olds = [
        path
        for path in _legacy_siblings(target)["old"]
        if (path / MANIFEST_FILE).is_file() and (path / INDEX_FILE).is_file()
    ]
    if not olds:
        return
    newest = max(olds, key=lambda path: path.stat().st_mtime)
    try:
        os.rename(newest, target)
    except OSError:
        return  # someone else restored or created it first
    _fsync_path(target.parent)
    LOGGER.warning("restored the index at %s that an interrupted save had left aside as %s", target, newest.name)


def _remove_legacy_siblings(target: Path) -> None:
    for paths in _legacy_siblings(target).values():
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)


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
    if (live != CURRENT and not _VERSION_NAME.match(live)) or (directory / live).is_symlink():
        raise IndexCorruptError(
            f"{directory / CURRENT} points to {live!r}, not to a version folder of this index: rebuild the "
            "index with `street2shop index`"
        )
    return live, directory / live


def _read_version(folder: Path) -> Tuple[Any, Dict[str, Any]]:
    """Read and verify one version folder; each file is hashed and parsed from the same open handle,
    so a file replaced meanwhile cannot pair one version's checksum with another's content."""
    manifest_path = folder / MANIFEST_FILE
    index_path = folder / INDEX_FILE
    for path in (manifest_path, index_path):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: rebuild the index with `street2shop index`")
    manifest = _read_manifest(manifest_path)
    with open(index_path, "rb") as handle:
        checksum = _sha256_handle(handle)
        if checksum != manifest["checksum"]:
            raise IndexCorruptError(
                f"{index_path} does not match the checksum in {manifest_path} (sha256 {checksum[:12]}... "
                f"vs {str(manifest['checksum'])[:12]}...): the file is corrupt or was replaced; rebuild the "
                "index with `street2shop index`"
            )
        handle.seek(0)
        try:
            cpu_index = faiss.read_index(faiss.PyCallbackIOReader(handle.read))
        except RuntimeError as error:
            raise IndexCorruptError(f"faiss cannot read {index_path}: {error}") from None
    _check_against_index(manifest, manifest_path, cpu_index)
    for name, expected in manifest["attachments"].items():
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing from the saved index: rebuild it with `street2shop index`")
        if sha256_file(path) != expected:
            raise IndexCorruptError(f"{path} does not match its checksum in {manifest_path}: rebuild the index")
    return cpu_index, manifest


def _read_manifest(path: Path) -> Dict[str, Any]:
    """Parse and check a manifest before anything in it is trusted."""
    rebuild = "rebuild the index with `street2shop index`"
    try:
        with open(path, "rb") as handle:
            manifest = json.loads(handle.read().decode("utf-8"))
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise IndexCorruptError(f"{path} is not valid JSON ({type(error).__name__}): {rebuild}") from None
    if not isinstance(manifest, dict):
        raise IndexCorruptError(f"{path} does not hold a JSON object: {rebuild}")
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise ValueError(
            f"index at {path.parent} has format_version {version!r} but this street2shop reads up to "
            f"{FORMAT_VERSION}: upgrade street2shop or rebuild the index with `street2shop index`"
        )
    if version == FORMAT_VERSION:
        stored = manifest.get(_MANIFEST_CHECKSUM)
        if stored != manifest_checksum(manifest):
            raise IndexCorruptError(
                f"{path} does not match its own manifest_checksum: it was edited or damaged; {rebuild}"
            )
    elif version == 1:
        # Format 1 manifests carry no checksum of their own: they load, but re-saving protects them.
        LOGGER.warning("%s is format 1 (its product ids are not checksummed): save the index again to upgrade it", path)
    else:
        raise IndexCorruptError(f"{path} has format_version {version!r}, which no street2shop writes here: {rebuild}")
    missing = [key for key in _REQUIRED_KEYS if key not in manifest]
    if missing:
        raise IndexCorruptError(f"{path} lacks {', '.join(missing)}: {rebuild}")
    product_ids = manifest["product_ids"]
    if not isinstance(product_ids, list) or not all(isinstance(pid, str) for pid in product_ids):
        raise IndexCorruptError(f"{path}: product_ids is not a list of strings: {rebuild}")
    if len(set(product_ids)) != len(product_ids):
        raise IndexCorruptError(f"{path}: product_ids contains duplicates: {rebuild}")
    attachments = manifest.setdefault("attachments", {})
    if not isinstance(attachments, dict) or not all(isinstance(value, str) for value in attachments.values()):
        raise IndexCorruptError(f"{path}: attachments is not a map of file names to sha256: {rebuild}")
    unknown = sorted(set(attachments) - KNOWN_ATTACHMENTS)
    if unknown:
        raise IndexCorruptError(
            f"{path} lists attachments {unknown[:5]} outside {sorted(KNOWN_ATTACHMENTS)}: {rebuild}"
        )
    for key in ("search_params", "metadata"):
        if not isinstance(manifest.get(key, {}), dict):
            raise IndexCorruptError(f"{path}: {key} is not a JSON object: {rebuild}")
    _check_metadata(manifest.get("metadata", {}), IndexCorruptError, str(path))
    return manifest


def _check_against_index(manifest: Dict[str, Any], manifest_path: Path, cpu_index: Any) -> None:
    product_ids = manifest["product_ids"]
    if not (len(product_ids) == manifest["ntotal"] == cpu_index.ntotal):
        raise IndexCorruptError(
            f"{manifest_path}: manifest lists {len(product_ids)} product ids and ntotal "
            f"{manifest['ntotal']}, but {INDEX_FILE} holds {cpu_index.ntotal} vectors"
        )
    if manifest["dim"] != cpu_index.d:
        raise IndexCorruptError(
            f"{manifest_path}: manifest says dim {manifest['dim']} but {INDEX_FILE} has dim {cpu_index.d}"
        )


def _check_metadata(metadata: Any, error: type, where: str) -> None:
    """A descriptor name may not name a checkpoint (``name@path``): a manifest could otherwise point a
    query at any checkpoint on disk."""
    if metadata is None:
        return
    descriptor = metadata.get("descriptor") if isinstance(metadata, dict) else None
    if descriptor is not None and (not isinstance(descriptor, str) or "@" in descriptor):
        raise error(
            f"{where}: descriptor {descriptor!r} must be a plain descriptor name, not a checkpoint "
            "reference (name@path); index with the descriptor's registered name"
        )


# ------------------------------------------------------------------------------------ ownership
def _is_our_link(target: Path, name: str) -> bool:
    try:
        return os.readlink(target / name) == f"{CURRENT}/{name}"
    except OSError:
        return False


def _flat_files(target: Path) -> Set[str]:
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


def _foreign_entries(target: Path) -> list:
    """Names in ``target`` that no save of ours made, sorted."""
    flat = _flat_files(target)
    foreign = []
    for entry in os.scandir(target):
        name = entry.name
        if name == LOCK_FILE and entry.is_file(follow_symlinks=False):
            continue
        if name == CURRENT and (entry.is_symlink() or entry.is_dir()):
            continue
        if name.startswith(VERSION_PREFIX) and entry.is_dir(follow_symlinks=False):
            continue
        if name.startswith(_TMP_PREFIX) and entry.is_symlink():
            continue
        if name in flat or (name in _LINKED and _is_our_link(target, name)):
            continue
        foreign.append(name)
    return sorted(foreign)


# ------------------------------------------------------------------------------------ fsync
def _sha256_handle(handle: Any, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(chunk_bytes), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its renames and new entries durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
