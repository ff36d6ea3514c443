"""A saved index under hostile conditions: tampered bytes, kill -9 at every step of a save, concurrent
writers and readers, symlinked and foreign-occupied destinations, the umask, the format-1 flat layout.

Every index here is tiny (20 vectors of dim 8, flat), so each test runs in about a second."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List

import faiss
import numpy as np
import pytest

from index import (
    KNOWN_ATTACHMENTS,
    IndexCorruptError,
    IndexLockedError,
    ProductIndex,
    check_index_destination,
    layout,
)
from index.layout import LINKED, SAVE_STEPS
from index.manifest import manifest_checksum, sha256_file
from index.storage import live_version_dir

DIM = 8
QUERIES = np.random.default_rng(99).standard_normal((6, DIM)).astype(np.float32)


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/conftest.py


def make_catalog(seed: int, n: int = 20, prefix: str = "p") -> ProductIndex:
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return ProductIndex.build(
        vectors,
        [f"{prefix}{i}" for i in range(n)],
        preset="flat",
        device="cpu",
        metadata={"descriptor": "gem", "fingerprint": f"f{seed}", "dim": DIM},
    )


def make_attachments(seed: int) -> Dict[str, bytes]:
    return {
        name: f"{name} state {seed}".encode() * 3 + bytes((seed + i) % 256 for i in range(64))
        for name in sorted(KNOWN_ATTACHMENTS)
    }


def snapshot(catalog: ProductIndex) -> tuple:
    """Everything a query depends on: ids in label order, stored vectors, results, metadata."""
    scores, ids = catalog.search(QUERIES, k=5)
    vectors = catalog._cpu_index.reconstruct_n(0, catalog.ntotal)
    return (
        tuple(catalog.product_ids),
        vectors.tobytes(),
        scores.tobytes(),
        tuple(map(tuple, ids.tolist())),
        json.dumps(catalog.metadata, sort_keys=True),
    )


def write_format1(directory: Path, catalog: ProductIndex, attachments: Dict[str, bytes]) -> None:
    """A flat index exactly as the format-1 writer left it (no manifest checksum, plain files)."""
    directory.mkdir(parents=True)
    faiss.write_index(catalog._cpu_index, str(directory / "index.faiss"))
    for name, payload in attachments.items():
        (directory / name).write_bytes(payload)
    manifest = {
        "format_version": 1,
        "preset": "flat",
        "factory_string": "Flat",
        "metric": "inner_product",
        "dim": catalog.dim,
        "ntotal": catalog.ntotal,
        "search_params": {},
        "tuning": None,
        "created": "2024-01-01T00:00:00+00:00",
        "metadata": catalog.metadata,
        "product_ids": catalog.product_ids,
        "checksum": sha256_file(directory / "index.faiss"),
        "attachments": {name: hashlib.sha256(payload).hexdigest() for name, payload in attachments.items()},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))


def rewrite_manifest(directory: Path, edit: Callable[[dict], None], reseal: bool) -> None:
    path = live_version_dir(directory) / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    if reseal:
        manifest["manifest_checksum"] = manifest_checksum(manifest)
    path.write_text(json.dumps(manifest, indent=1))


def load_outcome(directory: Path):
    """The loaded snapshot with the attachment bytes of exactly that version, or the documented error."""
    try:
        loaded = ProductIndex.load(directory, device="cpu")
    except (IndexCorruptError, FileNotFoundError) as error:
        return type(error)
    except ValueError as error:  # the one documented plain ValueError: a newer format
        assert "format_version" in str(error), error
        return ValueError
    return snapshot(loaded), {
        name: loaded.read_attachment(name) for name in sorted(KNOWN_ATTACHMENTS) if name in loaded._attachment_checksums
    }


def expected_entries(attachments) -> set:
    """What a directory holds after a clean save: nothing else may be left behind."""
    return {".lock", "current", "index.faiss", "manifest.json"} | set(attachments)


def assert_clean(directory: Path, attachments) -> None:
    entries = set(os.listdir(directory))
    versions = [name for name in entries if name.startswith(".v-")]
    assert len(versions) == 1, sorted(entries)
    assert entries - set(versions) == expected_entries(attachments), sorted(entries)
    assert os.readlink(directory / "current") == versions[0]
    # No leftovers of the format-1 writer beside it either.
    assert not [name for name in os.listdir(directory.parent) if name.startswith(f".{directory.name}.")]


def assert_links_follow_the_live_version(directory: Path) -> None:
    """``<dir>/<name>`` (what the engine opens) has the bytes of the live version's file, or is absent."""
    live = live_version_dir(directory)
    for name in LINKED:
        if os.path.exists(directory / name):
            assert (directory / name).read_bytes() == (live / name).read_bytes(), name


# ------------------------------------------------------------------------------------ tampering
def test_every_manifest_byte_flip_is_refused_or_harmless(tmp_path):
    target = ProductIndex.save(make_catalog(1), tmp_path / "idx", attachments=make_attachments(1))
    reference = load_outcome(target)
    manifest_path = live_version_dir(target) / "manifest.json"
    original = manifest_path.read_bytes()
    outcomes: Counter = Counter()
    started = time.perf_counter()
    for position in range(len(original)):
        for mask in (0x01, 0x20, 0xFF):  # a low bit, the letter-case bit, every bit
            damaged = bytearray(original)
            damaged[position] ^= mask
            manifest_path.write_bytes(bytes(damaged))
            outcome = load_outcome(target)
            if isinstance(outcome, tuple):
                assert outcome == reference, f"byte {position} ^ {mask:#x} loaded a different index"
                outcomes["identical"] += 1
            else:
                outcomes[outcome.__name__] += 1
    manifest_path.write_bytes(original)
    assert load_outcome(target) == reference
    assert outcomes["IndexCorruptError"] > 0.9 * 3 * len(original), outcomes
    assert time.perf_counter() - started < 60


def test_index_and_attachment_byte_flips_are_refused(tmp_path):
    target = ProductIndex.save(make_catalog(1), tmp_path / "idx", attachments=make_attachments(1))
    live = live_version_dir(target)
    for name in ["index.faiss", *sorted(KNOWN_ATTACHMENTS)]:
        path = live / name
        original = path.read_bytes()
        positions = sorted(
            set(np.random.default_rng(0).choice(len(original), size=min(64, len(original)), replace=False).tolist())
            | {0, len(original) - 1}
        )
        for position in positions:
            damaged = bytearray(original)
            damaged[position] ^= 0xFF
            path.write_bytes(bytes(damaged))
            with pytest.raises(IndexCorruptError, match=name):
                ProductIndex.load(target, device="cpu")
        path.write_bytes(original)
    ProductIndex.load(target, device="cpu")


def test_swapped_product_ids_are_refused(tmp_path):
    """The hostile tester's edit: two ids swapped, so `query` would name the wrong product."""
    target = make_catalog(1).save(tmp_path / "idx")

    def swap(manifest):
        ids = manifest["product_ids"]
        ids[0], ids[1] = ids[1], ids[0]

    rewrite_manifest(target, swap, reseal=False)
    with pytest.raises(IndexCorruptError, match=r"manifest\.json.*manifest_checksum.*rebuild"):
        ProductIndex.load(target, device="cpu")


def test_attachment_names_are_limited_to_the_known_files(tmp_path):
    catalog = make_catalog(1)
    for name in ("notes.txt", "../escape.pt", ".lock", "manifest.json", "index.faiss", "current"):
        with pytest.raises(ValueError, match="descriptor.pt"):
            catalog.save(tmp_path / "refused", attachments={name: b"x"})
    assert not (tmp_path / "refused").exists(), "a refused save must not create the directory"

    target = catalog.save(tmp_path / "idx", attachments=make_attachments(1))
    outside = tmp_path / "outside.txt"
    outside.write_text("not an attachment")
    rewrite_manifest(
        target,
        lambda m: m["attachments"].update({"../../outside.txt": hashlib.sha256(b"not an attachment").hexdigest()}),
        reseal=True,
    )
    with pytest.raises(IndexCorruptError, match="outside.txt"):
        ProductIndex.load(target, device="cpu")
    catalog.save(target, attachments=make_attachments(2))
    assert outside.read_text() == "not an attachment"


def test_format1_manifest_cannot_claim_a_users_file(tmp_path):
    """The old writer deleted any file its old manifest listed: a user's notes.txt was."""
    legacy = tmp_path / "legacy"
    write_format1(legacy, make_catalog(1), {"descriptor.pt": b"state"})
    (legacy / "notes.txt").write_text("mine")
    manifest = json.loads((legacy / "manifest.json").read_text())
    manifest["attachments"]["notes.txt"] = hashlib.sha256(b"mine").hexdigest()
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptError, match="notes.txt"):
        ProductIndex.load(legacy, device="cpu")
    with pytest.raises(FileExistsError, match="notes.txt"):
        make_catalog(2).save(legacy)
    assert (legacy / "notes.txt").read_text() == "mine"


def test_descriptor_naming_a_checkpoint_is_refused(tmp_path):
    vectors = np.random.default_rng(0).standard_normal((20, DIM)).astype(np.float32)
    sneaky = ProductIndex.build(
        vectors, [f"p{i}" for i in range(20)], device="cpu", metadata={"descriptor": "gem@/tmp/anything.pt"}
    )
    with pytest.raises(ValueError, match="@"):
        sneaky.save(tmp_path / "idx")
    assert not (tmp_path / "idx").exists()
    target = make_catalog(1).save(tmp_path / "idx")
    rewrite_manifest(target, lambda m: m["metadata"].update(descriptor="gem@/tmp/anything.pt"), reseal=True)
    with pytest.raises(IndexCorruptError, match="checkpoint"):
        ProductIndex.load(target, device="cpu")


# ------------------------------------------------------------------------------------ kill -9
def run_in_child(body: Callable[[], None]) -> int:
    """Run ``body`` in a forked child; its exit code (137 when it killed itself at a crash point)."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            body()
        except BaseException:  # noqa: BLE001 - the exit code reports it
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def prepare(scenario: str, directory: Path, old: ProductIndex) -> None:
    if scenario == "versioned":
        old.save(directory, attachments=make_attachments(1))
    elif scenario == "flat":
        write_format1(directory, old, {"descriptor.pt": make_attachments(1)["descriptor.pt"]})
        # A crashed format-1 overwrite's staging folder beside it, for the cleanup to find.
        leaked = directory.parent / f".{directory.name}.tmp-abcd_123"
        leaked.mkdir()
        (leaked / "index.faiss").write_bytes(b"half")


@pytest.mark.parametrize("scenario", ["fresh", "versioned", "flat"])
def test_kill_at_every_step_of_a_save_leaves_old_or_new(tmp_path, scenario, monkeypatch):
    old, new = make_catalog(1), make_catalog(2, n=25, prefix="q")
    new_attachments = make_attachments(2)

    # A dry run lists the crash points this save passes through, in order.
    steps: List[str] = []
    prepare(scenario, tmp_path / "dry" / "idx", old)
    monkeypatch.setattr(layout, "_crash_point", steps.append)
    new.save(tmp_path / "dry" / "idx", attachments=new_attachments)
    monkeypatch.undo()
    expected_steps = [s for s in SAVE_STEPS if scenario == "flat" or not s.startswith("flat-")]
    assert sorted(set(steps), key=SAVE_STEPS.index) == expected_steps
    prepare(scenario, tmp_path / "reference" / "idx", old)
    old_outcome = load_outcome(tmp_path / "reference" / "idx")
    assert (old_outcome is FileNotFoundError) == (scenario == "fresh")
    new_outcome = load_outcome(tmp_path / "dry" / "idx")

    seen: Counter = Counter()
    for number, step in enumerate(steps):
        seen[step] += 1
        occurrence = seen[step]
        target = tmp_path / f"run{number}" / "idx"
        prepare(scenario, target, old)

        def child(step: str = step, occurrence: int = occurrence, target: Path = target) -> None:
            passed: Counter = Counter()

            def crash_at(name: str) -> None:
                passed[name] += 1
                if name == step and passed[name] == occurrence:
                    os._exit(137)  # as abrupt as kill -9: no cleanup, no finally blocks

            layout._crash_point = crash_at
            new.save(target, attachments=new_attachments)

        assert run_in_child(child) == 137, f"the save never reached {step} #{occurrence}"
        outcome = load_outcome(target)
        assert outcome in (old_outcome, new_outcome), f"killed at {step} #{occurrence}: {outcome!r}"
        if outcome is not FileNotFoundError:
            assert_links_follow_the_live_version(target)
        # The next save succeeds and tidies every leftover.
        third = make_catalog(3)
        third.save(target, attachments=make_attachments(3))
        assert load_outcome(target) == (snapshot(third), {n: make_attachments(3)[n] for n in sorted(KNOWN_ATTACHMENTS)})
        assert_clean(target, make_attachments(3))


def test_load_removes_what_a_killed_save_left(tmp_path):
    """A save killed after writing its version folder leaves it behind; the next load removes it, and
    the full copies the format-1 writer leaked beside the directory."""
    target = make_catalog(1).save(tmp_path / "idx", attachments=make_attachments(1))

    def child() -> None:
        layout._crash_point = lambda name: os._exit(137) if name == "version-synced" else None
        make_catalog(2).save(target, attachments=make_attachments(2))

    assert run_in_child(child) == 137
    assert len([n for n in os.listdir(target) if n.startswith(".v-")]) == 2
    write_format1(tmp_path / ".idx.old-zz9_zz9z", make_catalog(3), {})  # leaked by the format-1 writer
    assert load_outcome(target)[0] == snapshot(make_catalog(1))
    assert_clean(target, make_attachments(1))


def test_index_left_aside_by_the_format1_writer_is_restored(tmp_path):
    """The old writer, killed between its two renames, left no index and the old one as .idx.old-*."""
    aside = tmp_path / ".idx.old-k2j4h5g6"
    write_format1(aside, make_catalog(1), {})
    staging = tmp_path / ".idx.tmp-a1b2c3d4"
    write_format1(staging, make_catalog(2), {})
    assert load_outcome(tmp_path / "idx")[0] == snapshot(make_catalog(1))
    make_catalog(3).save(tmp_path / "idx")
    assert sorted(os.listdir(tmp_path)) == ["idx"]
    assert_clean(tmp_path / "idx", {})


# ------------------------------------------------------------------------------------ concurrency
def test_two_concurrent_writers_take_turns(tmp_path):
    target = tmp_path / "idx"
    catalogs = {seed: make_catalog(seed, n=20 + seed) for seed in (1, 2)}
    start = time.time() + 0.3  # both children begin together

    def writer(seed: int) -> Callable[[], None]:
        def body() -> None:
            time.sleep(max(0.0, start - time.time()))
            for _ in range(15):
                catalogs[seed].save(target, attachments=make_attachments(seed))

        return body

    pids = []
    for seed in (1, 2):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                writer(seed)()
            except BaseException:  # noqa: BLE001
                code = 1
            os._exit(code)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert codes == [0, 0]
    loaded = load_outcome(target)
    assert loaded[0] in (snapshot(catalogs[1]), snapshot(catalogs[2]))
    assert_clean(target, make_attachments(1))


def test_a_writer_waits_for_the_lock_then_gives_up_with_one_clear_line(tmp_path):
    target = make_catalog(1).save(tmp_path / "idx")
    holder = os.open(target / ".lock", os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(IndexLockedError) as caught:
            make_catalog(2).save(target, lock_timeout=0.3)
        assert 0.3 <= time.monotonic() - started < 5
        message = str(caught.value)
        assert "\n" not in message and str(target) in message and "another process" in message
        assert isinstance(caught.value, TimeoutError)
    finally:
        os.close(holder)
    assert load_outcome(target)[0] == snapshot(make_catalog(1))  # untouched by the refused save
    make_catalog(2).save(target, lock_timeout=0.3)


@pytest.mark.parametrize("start", ["versioned", "flat"])
def test_a_reader_never_sees_a_missing_or_mixed_index(tmp_path, start):
    target = tmp_path / "idx"
    catalogs = [make_catalog(seed, n=20 + seed) for seed in (1, 2)]
    prepare(start, target, catalogs[0])
    acceptable = {snapshot(catalog) for catalog in catalogs}

    stop = tmp_path / "stop"
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            saves = 0
            while saves < 20 or not stop.exists():  # at least 20 saves, and until the reader has read enough
                catalogs[saves % 2].save(target, attachments=make_attachments(1 + saves % 2))
                saves += 1
            if saves % 2:  # end on catalog 1 with attachments 2, so the final state is known
                catalogs[1].save(target, attachments=make_attachments(2))
        except BaseException:  # noqa: BLE001
            code = 1
        os._exit(code)
    loads = 0
    while True:
        finished, status = os.waitpid(pid, os.WNOHANG)
        loaded = ProductIndex.load(target, device="cpu")  # raises on a missing or corrupt index
        assert snapshot(loaded) in acceptable
        loads += 1
        if loads == 200:
            stop.touch()
        if finished:
            break
    assert os.waitstatus_to_exitcode(status) == 0
    assert loads >= 200
    assert snapshot(ProductIndex.load(target, device="cpu")) == snapshot(catalogs[1])
    assert_clean(target, make_attachments(2))


# ------------------------------------------------------------------------------------ destinations
def test_symlinked_destination_is_written_through(tmp_path):
    real = tmp_path / "real"
    link = tmp_path / "link"
    link.symlink_to("real", target_is_directory=True)  # dangling until the first save creates it
    make_catalog(1).save(link)
    make_catalog(2).save(link, attachments=make_attachments(2))
    assert link.is_symlink() and os.readlink(link) == "real"
    assert (real / "current").is_symlink()
    assert load_outcome(link)[0] == load_outcome(real)[0] == snapshot(make_catalog(2))
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def test_foreign_destinations_are_refused_before_any_work(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_index_destination(tmp_path / "empty") == tmp_path / "empty"
    assert check_index_destination(tmp_path / "new" / "idx") == tmp_path / "new" / "idx"
    assert not (tmp_path / "new").exists(), "the check creates nothing"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        check_index_destination(tmp_path / "file")
    with pytest.raises(NotADirectoryError, match="is a file"):
        ProductIndex.check_destination(tmp_path / "file" / "idx")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        check_index_destination(occupied)

    target = make_catalog(1).save(tmp_path / "idx", attachments=make_attachments(1))
    check_index_destination(target)  # a saved index is ours to replace
    for intruder in ("notes.txt", "descriptor.pt.bak"):
        (target / intruder).write_text("mine")
        with pytest.raises(FileExistsError, match=intruder.replace(".", r"\.")):
            make_catalog(2).save(target, attachments=make_attachments(2))
        assert (target / intruder).read_text() == "mine"
        (target / intruder).unlink()
    # A plain file under a name we would otherwise link is the user's, not ours.
    os.unlink(target / "local_features.npz")
    (target / "local_features.npz").write_text("mine")
    with pytest.raises(FileExistsError, match="local_features.npz"):
        make_catalog(2).save(target)
    assert (target / "local_features.npz").read_text() == "mine"
    assert load_outcome(target)[0] == snapshot(make_catalog(1))


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_created_folders_and_files_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        target = make_catalog(1).save(tmp_path / "a" / "idx", attachments=make_attachments(1))
    finally:
        os.umask(previous)
    version = live_version_dir(target)
    for folder in (tmp_path / "a", target, version):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, folder
    for path in [target / ".lock", *version.iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_every_written_file_and_folder_is_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(descriptor):
        synced.append(os.path.realpath(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = make_catalog(1).save(tmp_path / "idx", attachments=make_attachments(1))
    make_catalog(2).save(target, attachments=make_attachments(2))
    version = live_version_dir(target)
    for path in [target, version, *version.iterdir()]:
        assert os.path.realpath(path) in synced, path
    assert os.path.realpath(tmp_path) in synced  # the new directory's own entry


# ------------------------------------------------------------------------------------ compatibility
def test_format1_flat_index_loads_and_is_replaced_safely(tmp_path, caplog):
    legacy = tmp_path / "legacy"
    write_format1(legacy, make_catalog(1), {"descriptor.pt": b"state one"})
    loaded = ProductIndex.load(legacy, device="cpu")
    assert snapshot(loaded) == snapshot(make_catalog(1)) and loaded.read_attachment("descriptor.pt") == b"state one"
    assert "format 1" in caplog.text
    make_catalog(2).save(legacy, attachments=make_attachments(2))
    assert load_outcome(legacy) == (snapshot(make_catalog(2)), make_attachments(2))
    assert_clean(legacy, make_attachments(2))


def test_copies_of_an_index_load(tmp_path):
    target = make_catalog(1).save(tmp_path / "idx", attachments=make_attachments(1))
    reference = load_outcome(target)
    subprocess.run(["cp", "-r", str(target), str(tmp_path / "cp-copy")], check=True)
    shutil.copytree(target, tmp_path / "deref-copy")  # follows every link: `current` becomes a folder
    for copy in ("cp-copy", "deref-copy"):
        assert load_outcome(tmp_path / copy) == reference, copy
        make_catalog(2).save(tmp_path / copy, attachments=make_attachments(2))
        assert load_outcome(tmp_path / copy) == (snapshot(make_catalog(2)), make_attachments(2))
        assert_clean(tmp_path / copy, make_attachments(2))
    assert load_outcome(target) == reference  # the copies share nothing with the original


def test_attachment_path_stays_with_the_loaded_version(tmp_path):
    target = make_catalog(1).save(tmp_path / "idx", attachments=make_attachments(1))
    loaded = ProductIndex.load(target, device="cpu")
    pinned = loaded.attachment_path("descriptor.pt")
    assert (target / "descriptor.pt").read_bytes() == pinned.read_bytes() == make_attachments(1)["descriptor.pt"]
    with pytest.raises(ValueError, match="descriptor.pt"):
        loaded.attachment_path("notes.txt")
    make_catalog(2).save(target)  # no attachments this time
    assert not (target / "descriptor.pt").exists()
    assert not os.path.lexists(target / "descriptor.pt"), "links of attachments gone are removed"
    with pytest.raises(FileNotFoundError):
        loaded.read_attachment("descriptor.pt")  # its version was deleted by the save
    with pytest.raises(FileNotFoundError, match="descriptor.pt"):
        ProductIndex.load(target, device="cpu").attachment_path("descriptor.pt")


def test_a_saved_index_knows_the_attachments_it_wrote(tmp_path):
    index = make_catalog(1)
    assert not index.has_attachment("descriptor.pt")  # never saved
    index.save(tmp_path / "idx", attachments={"descriptor.pt": b"state one"})
    assert index.has_attachment("descriptor.pt") and index.read_attachment("descriptor.pt") == b"state one"
    assert not index.has_attachment("query_bank.npz")
    index.save(tmp_path / "idx", attachments=make_attachments(1))
    for name, payload in make_attachments(1).items():
        assert index.has_attachment(name) and index.read_attachment(name) == payload
    index.save(tmp_path / "idx")  # no attachments this time
    assert not index.has_attachment("descriptor.pt")
