"""On-disk layout of a saved index and its atomic write.

A saved index is a directory holding two files::

    index.faiss     faiss.write_index of a CPU index
    manifest.json   format_version, preset, factory_string, metric, dim, ntotal, product_ids (in FAISS
                    label order), search_params, metadata, checksum (sha256 of index.faiss), created

Two files cannot be replaced together atomically, so the whole directory is: it is written as a hidden
sibling ``.<name>.tmp-*`` (same parent, hence same filesystem), then renamed into place. At every
moment the target is the old complete index, the new complete index, or (only between the two renames
of an overwrite) absent with the old one kept aside as ``.<name>.old-*``. A save killed half-way leaves
at worst a hidden temporary directory, never a half-written index that loads.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import faiss

from .errors import IndexCorruptError

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
_OUR_FILES = {INDEX_FILE, MANIFEST_FILE}
_REQUIRED_KEYS = ("format_version", "factory_string", "dim", "ntotal", "product_ids", "checksum")


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB indexes do not need to fit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_index_dir(
    directory: Path, cpu_index: Any, manifest: Dict[str, Any], attachments: Optional[Mapping[str, bytes]] = None
) -> None:
    """Atomically write ``cpu_index``, ``manifest`` (checksums filled in here) and ``attachments`` to ``directory``.

    Attachments are files the caller keeps beside the index (the engine stores the descriptor's fitted
    state there), written in the same staging directory so index and attachments change together;
    their sha256 goes into the manifest under ``attachments`` and is checked on load.

    Raises:
        FileExistsError: ``directory`` exists and holds files that are not a saved index; we refuse to
            replace (and so delete) someone else's files.
    """
    directory = Path(directory).absolute()
    if directory.exists():
        if not directory.is_dir():
            raise FileExistsError(f"{directory} exists and is not a directory")
        foreign = sorted(set(os.listdir(directory)) - _OUR_FILES - _previous_attachments(directory))
        if foreign:
            raise FileExistsError(
                f"{directory} exists and holds files that are not part of a saved index "
                f"({', '.join(foreign[:5])}): choose an empty or new directory"
            )
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        index_path = staging / INDEX_FILE
        faiss.write_index(cpu_index, str(index_path))
        _fsync_file(index_path)
        attached: Dict[str, str] = {}
        for name, payload in (attachments or {}).items():
            if name in _OUR_FILES or Path(name).name != name or name.startswith("."):
                raise ValueError(f"attachment name {name!r} must be a plain file name other than {sorted(_OUR_FILES)}")
            with open(staging / name, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            attached[name] = hashlib.sha256(payload).hexdigest()
        manifest = dict(manifest, checksum=sha256_file(index_path), attachments=attached)
        manifest_path = staging / MANIFEST_FILE
        with open(manifest_path, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        _swap_into_place(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_index_dir(directory: Path) -> Tuple[Any, Dict[str, Any]]:
    """Read and verify a directory written by :func:`write_index_dir`.

    Returns:
        ``(cpu_index, manifest)``; the manifest has been checked against the index (checksum, format
        version, dim, ntotal, id count and uniqueness).

    Raises:
        FileNotFoundError: the directory or one of its files is missing.
        IndexCorruptError: checksum mismatch, unreadable manifest, or manifest inconsistent with index.
        ValueError: the index was written by a newer format than this code reads.
    """
    directory = Path(directory)
    for path in (directory, directory / MANIFEST_FILE, directory / INDEX_FILE):
        if not path.exists():
            raise FileNotFoundError(
                f"no saved index at {directory} ({path} is missing): build one with `street2shop index`"
            )
    manifest_path = directory / MANIFEST_FILE
    index_path = directory / INDEX_FILE
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IndexCorruptError(f"{manifest_path} is not valid JSON ({error}): rebuild the index") from None
    if not isinstance(manifest, dict):
        raise IndexCorruptError(f"{manifest_path} does not hold a JSON object: rebuild the index")
    missing = [key for key in _REQUIRED_KEYS if key not in manifest]
    if missing:
        raise IndexCorruptError(f"{manifest_path} lacks {', '.join(missing)}: rebuild the index")
    version = manifest["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"index at {directory} has format_version {version!r} but this street2shop reads up to "
            f"{FORMAT_VERSION}: upgrade street2shop or rebuild the index with `street2shop index`"
        )
    checksum = sha256_file(index_path)
    if checksum != manifest["checksum"]:
        raise IndexCorruptError(
            f"{index_path} does not match the checksum in {manifest_path} (sha256 {checksum[:12]}... "
            f"vs {str(manifest['checksum'])[:12]}...): the file is corrupt or was replaced; rebuild the "
            "index with `street2shop index`"
        )
    try:
        cpu_index = faiss.read_index(str(index_path))
    except RuntimeError as error:
        raise IndexCorruptError(f"faiss cannot read {index_path}: {error}") from None
    product_ids = manifest["product_ids"]
    if not isinstance(product_ids, list) or not all(isinstance(pid, str) for pid in product_ids):
        raise IndexCorruptError(f"{manifest_path}: product_ids is not a list of strings")
    if not (len(product_ids) == manifest["ntotal"] == cpu_index.ntotal):
        raise IndexCorruptError(
            f"{directory}: manifest lists {len(product_ids)} product ids and ntotal "
            f"{manifest['ntotal']}, but {INDEX_FILE} holds {cpu_index.ntotal} vectors"
        )
    if len(set(product_ids)) != len(product_ids):
        raise IndexCorruptError(f"{manifest_path}: product_ids contains duplicates")
    if manifest["dim"] != cpu_index.d:
        raise IndexCorruptError(
            f"{directory}: manifest says dim {manifest['dim']} but {INDEX_FILE} has dim {cpu_index.d}"
        )
    for name, expected in manifest.get("attachments", {}).items():
        path = directory / name
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing from the saved index: rebuild it with `street2shop index`")
        if sha256_file(path) != expected:
            raise IndexCorruptError(f"{path} does not match its checksum in {manifest_path}: rebuild the index")
    return cpu_index, manifest


def _previous_attachments(directory: Path) -> set:
    """Names of the attachments a saved index in ``directory`` declares (they may be replaced)."""
    try:
        with open(directory / MANIFEST_FILE, encoding="utf-8") as handle:
            return set(json.load(handle).get("attachments", {}))
    except (OSError, ValueError, AttributeError):
        return set()


def _swap_into_place(staging: Path, directory: Path) -> None:
    if not directory.exists():
        os.replace(staging, directory)
        return
    # rename(2) cannot replace a non-empty directory, so the old index steps aside first and is
    # deleted only once the new one is in place.
    retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
    os.rmdir(retired)
    os.replace(directory, retired)
    try:
        os.replace(staging, directory)
    except BaseException:
        os.replace(retired, directory)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
