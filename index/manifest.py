"""The manifest of a saved index and every check a load runs before trusting a version folder.

A version folder holds ``index.faiss``, ``manifest.json`` and the attachments (see ``index.storage`` for
the directory around it). The manifest lists the product ids and checksums the others must match, and
carries its own checksum (format 2); here it is sealed on save and parsed, checked and matched against
the files on load. Nothing here writes to disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import faiss

from .errors import IndexCorruptError
from .layout import INDEX_DATA_FILES, INDEX_FILE, KNOWN_ATTACHMENTS, MANIFEST_FILE
from .ondisk import ONDISK_LAYOUT, READ_FLAGS, attach_ondisk_files
from .shards import SEPARATE_LAYOUT, attach_separate_files, check_separate_layout, separate_index_files

LOGGER = logging.getLogger("street2shop.index")

FORMAT_VERSION = 2
"""2: versioned layout and a manifest checksum. 1: flat layout, only index.faiss checksummed."""

_MANIFEST_CHECKSUM = "manifest_checksum"
_REQUIRED_KEYS = ("format_version", "factory_string", "dim", "ntotal", "product_ids", "checksum")


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


def jsonable_metadata(metadata: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """A copy of the caller's metadata, refused now (TypeError) when the manifest could not store it."""
    metadata = dict(metadata or {})
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as error:
        raise TypeError(f"metadata must be JSON-able, it is stored in the manifest: {error}") from None
    return metadata


def index_manifest(
    cpu_index: Any,
    preset: str,
    factory_string: str,
    search_params: Any,
    tuning: Any,
    metadata: Any,
    product_ids: Any,
    layout: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """The manifest of a ProductIndex before `checksummed_manifest` seals it: its own fields, and what the
    index file (dim, ntotal) and this process (faiss version, time) tell. ``layout``: how the index is kept
    (None: ``{"kind": "single"}``, one index file; ``index.ondisk`` records shards merged on disk,
    ``index.shards`` shards kept apart)."""
    return {
        "format_version": FORMAT_VERSION,
        "layout": dict(layout or {"kind": "single"}),
        "preset": preset,
        "factory_string": factory_string,
        "metric": "inner_product",
        "dim": int(cpu_index.d),
        "ntotal": int(cpu_index.ntotal),
        "search_params": search_params,
        "tuning": tuning,
        "faiss_version": faiss.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metadata": metadata,
        "product_ids": product_ids,
    }


def checksummed_manifest(
    manifest: Mapping[str, Any],
    index_checksum: str,
    attachments: Dict[str, str],
    index_files: Optional[Dict[str, str]] = None,
) -> Dict[str, Any]:
    """``manifest`` as a save writes it: this format version, the sha256 of ``index.faiss``, of each
    attachment and of each other file of the index (``index_files``, the on-disk layout's), and its own
    checksum."""
    manifest = dict(manifest, format_version=FORMAT_VERSION, checksum=index_checksum, attachments=attachments)
    if index_files:
        manifest["index_files"] = index_files
    manifest.pop(_MANIFEST_CHECKSUM, None)
    # Checksum what a reader will parse (e.g. int dict keys become strings), not the caller's objects.
    manifest = json.loads(json.dumps(manifest))
    manifest[_MANIFEST_CHECKSUM] = manifest_checksum(manifest)
    return manifest


def checked_attachments(attachments: Optional[Mapping[str, bytes]]) -> Dict[str, bytes]:
    payloads: Dict[str, bytes] = {}
    for name, payload in (attachments or {}).items():
        if name not in KNOWN_ATTACHMENTS:
            raise ValueError(
                f"attachment name {name!r} is not one of {sorted(KNOWN_ATTACHMENTS)}: an index keeps only "
                "those files beside it (add a name to index.layout.KNOWN_ATTACHMENTS to keep another)"
            )
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"attachment {name!r} must be bytes, got {type(payload).__name__}")
        payloads[name] = bytes(payload)
    return payloads


def read_version(folder: Path) -> Tuple[Any, Dict[str, Any]]:
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
        ondisk = manifest["layout"]["kind"] == ONDISK_LAYOUT
        try:
            cpu_index = faiss.read_index(faiss.PyCallbackIOReader(handle.read), READ_FLAGS if ondisk else 0)
        except RuntimeError as error:
            raise IndexCorruptError(f"faiss cannot read {index_path}: {error}") from None
    # The files beside index.faiss are checked first: they are memory-mapped as they are.
    for name, expected in sorted({**manifest["index_files"], **manifest["attachments"]}.items()):
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing from the saved index: rebuild it with `street2shop index`")
        if sha256_file(path) != expected:
            raise IndexCorruptError(f"{path} does not match its checksum in {manifest_path}: rebuild the index")
    if ondisk:
        try:
            cpu_index = attach_ondisk_files(cpu_index, folder)
        except (RuntimeError, ValueError) as error:
            raise IndexCorruptError(f"faiss cannot map the on-disk index in {folder}: {error}") from None
    elif manifest["layout"]["kind"] == SEPARATE_LAYOUT:
        try:
            cpu_index = attach_separate_files(cpu_index, folder, manifest["layout"])
        except (RuntimeError, ValueError) as error:
            raise IndexCorruptError(f"the shards in {folder} do not fit {manifest_path}: {error}") from None
    _check_against_index(manifest, manifest_path, cpu_index)
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
    _check_layout(manifest, path, rebuild)
    for key in ("search_params", "metadata"):
        if not isinstance(manifest.get(key, {}), dict):
            raise IndexCorruptError(f"{path}: {key} is not a JSON object: {rebuild}")
    check_metadata(manifest.get("metadata", {}), IndexCorruptError, str(path))
    return manifest


def _check_layout(manifest: Dict[str, Any], path: Path, rebuild: str) -> None:
    """The layout record (absent: one in-memory index, as every index before layouts) and the files it
    needs, whose names must be the on-disk layout's own: a manifest cannot make us map arbitrary files."""
    layout = manifest.setdefault("layout", {"kind": "single"})
    index_files = manifest.setdefault("index_files", {})
    kinds = ("single", ONDISK_LAYOUT, SEPARATE_LAYOUT)
    if not isinstance(layout, dict) or layout.get("kind") not in kinds:
        raise IndexCorruptError(f"{path}: layout {str(layout)[:80]} is not one of {', '.join(kinds)}: {rebuild}")
    if not isinstance(index_files, dict) or not all(isinstance(value, str) for value in index_files.values()):
        raise IndexCorruptError(f"{path}: index_files is not a map of file names to sha256: {rebuild}")
    expected = set(INDEX_DATA_FILES) if layout["kind"] == ONDISK_LAYOUT else set()
    if layout["kind"] == SEPARATE_LAYOUT:
        problem = check_separate_layout(layout)
        if problem:
            raise IndexCorruptError(f"{path}: separate-shard layout: {problem}: {rebuild}")
        expected = set(separate_index_files(layout["shards"]))
    if set(index_files) != expected:
        raise IndexCorruptError(
            f"{path}: a {layout['kind']} index keeps {sorted(expected) or 'no files'} beside {INDEX_FILE}, but the "
            f"manifest lists {sorted(index_files)}: {rebuild}"
        )


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


def check_metadata(metadata: Any, error: type, where: str) -> None:
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


def _sha256_handle(handle: Any, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(chunk_bytes), b""):
        digest.update(chunk)
    return digest.hexdigest()
