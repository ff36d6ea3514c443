"""retrieval/training/map_cache.py: chunks computed once, a damaged chunk recomputed, the budget share respected."""

import logging
from types import SimpleNamespace

import numpy as np

from retrieval.training.delf import _load_chunk, _save_chunk
from retrieval.training.map_cache import cache_chunks


def chunk_of(c, inputs=None):
    """A chunk in delf's format: (maps (2n, C, h, w) float16, labels (2n,))."""
    rng = np.random.default_rng(c)
    return rng.standard_normal((4, 2, 3, 3)).astype(np.float16), np.arange(4) + 10 * c


def cached(tmp_path, computed, run=None, budget_share=None):
    def compute(c, inputs):
        computed.append(c)
        return chunk_of(c)

    return cache_chunks(
        3,
        lambda c: tmp_path / f"chunk-{c:05d}.npz",
        compute,
        save=_save_chunk,
        load=_load_chunk,
        run=run or SimpleNamespace(time_budget_s=None, elapsed=0.0),
        budget_share=budget_share,
        progress=False,
    )


def test_chunks_are_computed_once_and_a_damaged_one_is_recomputed(tmp_path, caplog):
    computed = []
    first = cached(tmp_path, computed)
    assert computed == [0, 1, 2]
    assert cached(tmp_path, computed) and computed == [0, 1, 2]  # all read back, nothing computed
    damaged = tmp_path / "chunk-00001.npz"
    payload = bytearray(damaged.read_bytes())
    payload[len(payload) // 2] ^= 0x01  # np.load would read this byte silently; the checksum does not
    damaged.write_bytes(bytes(payload))
    with caplog.at_level(logging.WARNING):
        again = cached(tmp_path, computed)
    assert computed == [0, 1, 2, 1] and "chunk-00001.npz are unusable" in caplog.text
    for (maps, labels), (maps_again, labels_again) in zip(first, again):
        assert np.array_equal(maps, maps_again) and np.array_equal(labels, labels_again)


def test_no_new_chunk_once_the_budget_share_is_spent(tmp_path):
    computed = []
    spent = SimpleNamespace(time_budget_s=100.0, elapsed=60.0)
    chunks = cached(tmp_path, computed, run=spent, budget_share=0.5)
    assert computed == [0] and len(chunks) == 1  # always one chunk, then the budget share stops it
