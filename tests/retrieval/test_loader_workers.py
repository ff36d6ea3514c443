"""Catalog photos decoded by DataLoader worker processes (`retrieval.batching.iter_mapped`): the same vectors in
the same order as decoding in this process, and the same errors, naming the file, for a bad image or a dead
worker. The synthetic set's product photos (tests/conftest.py) and two descriptors: colorhist (no network)
and gem (EfficientNet-Lite0), whose convolutions must see identical batches."""

from __future__ import annotations

import os
import re
import signal

import numpy as np
import pytest
from click.testing import CliRunner

from retrieval.batching import default_workers, iter_mapped, load_batch
from retrieval.datasets import load_dataset
from retrieval.descriptors import create_descriptor
from retrieval.features import extract_features
from retrieval.io import ImageReadError


@pytest.fixture(scope="module")
def photos(synthetic_root):
    return [str(p) for p in load_dataset(f"viton:{synthetic_root}", split="all").catalog["image"][:20]]


def embed_with(descriptor, paths, workers):
    return extract_features(
        descriptor.embed, paths, descriptor.input_spec.size, batch_size=3, chunk_size=8, workers=workers
    )


@pytest.mark.parametrize("name", ["colorhist", "gem"])
def test_workers_give_the_vectors_of_in_process_decoding_in_order(photos, name):
    descriptor = create_descriptor(name).eval()
    paths = photos if name == "colorhist" else photos[:7]
    alone = embed_with(descriptor, paths, workers=0)
    with_workers = embed_with(descriptor, paths, workers=2)
    assert alone.shape == (len(paths), descriptor.dim)
    assert np.abs(alone - with_workers).max() < 1e-6
    # order: row i is photo i (the first and last photos embedded on their own give rows 0 and -1)
    for row, path in ((0, paths[0]), (-1, paths[-1])):
        own = descriptor.embed(load_batch([path], descriptor.input_spec.size)).detach().numpy()[0]
        assert np.abs(with_workers[row] - own).max() < 1e-5


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_photo_raises_the_same_error_naming_the_file(photos, tmp_path, workers):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    paths = photos[:7] + [str(broken)] + photos[7:10]
    descriptor = create_descriptor("colorhist")
    with pytest.raises(ImageReadError, match="broken.jpg") as raised:
        embed_with(descriptor, paths, workers)
    assert "DataLoader" not in str(raised.value)  # the reader's own message, not a worker's traceback


def _die_on_three(item: int) -> int:
    if item == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does to a worker
    return item * 10


def test_a_dead_worker_is_an_error_naming_what_it_was_reading():
    assert list(iter_mapped(_die_on_three, [0, 1, 2], workers=2)) == [0, 10, 20]
    with pytest.raises(RuntimeError, match=r"worker died while items (\d)-(\d) of 5.*--workers 0") as raised:
        list(iter_mapped(_die_on_three, [0, 1, 2, 3, 4], workers=2))
    first, last = (int(n) for n in re.search(r"items (\d)-(\d)", str(raised.value)).groups())
    assert first <= 4 <= last  # item 4 (3) killed it


def test_worker_counts(monkeypatch):
    monkeypatch.setenv("STREET2SHOP_WORKERS", "3")
    assert default_workers() == 3
    monkeypatch.setenv("STREET2SHOP_WORKERS", "many")
    with pytest.raises(ValueError, match="STREET2SHOP_WORKERS.*whole number"):
        default_workers()
    monkeypatch.delenv("STREET2SHOP_WORKERS")
    for cpus, expected in ((1, 0), (2, 0), (3, 0), (4, 2), (8, 4), (64, 4)):
        monkeypatch.setattr(os, "cpu_count", lambda: cpus)
        assert default_workers() == expected, cpus
    with pytest.raises(ValueError, match="workers must be >= 0"):
        list(iter_mapped(str, [1, 2], workers=-1))


@pytest.mark.parametrize("command", ["index", "build", "add", "bench"])
def test_every_embedding_command_takes_workers(command):
    from street2shop.cli import cli

    answer = CliRunner().invoke(cli, [command, "--help"])
    assert answer.exit_code == 0 and "--workers" in answer.output
    refused = CliRunner().invoke(cli, [command, "--workers", "-1"])
    assert refused.exit_code == 2 and "--workers" in refused.output
