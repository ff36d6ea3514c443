"""Named index presets: FAISS factory strings chosen from the catalog size and vector dimension.

Every preset uses the inner-product metric on L2-normalised vectors, so scores are cosine similarities.

===============  =======================================  ===========================================
preset           factory string                           when to use it
===============  =======================================  ===========================================
``flat``         ``Flat``                                 exact search; the reference, fine up to ~1M
                                                          products
``ivfpq``        ``IVF{nlist},PQ{m}x4fs,Refine(SQ8)``     large catalogs on CPU; IVF + 4-bit fast-scan
                                                          PQ find candidates, 8-bit scalar-quantised
                                                          copies of the vectors re-rank them. About
                                                          29% of flat's memory (at D=512: 512 B SQ8 +
                                                          64 B PQ + 8 B id per vector, against
                                                          2048 B); scores are SQ8 approximations
``ivfpq-rflat``  ``IVF{nlist},PQ{m}x{b}np,RFlat``         IVF + 8-bit PQ re-ranked from the exact
                                                          vectors: exact scores, memory of flat plus
                                                          the codes; the IVF-PQ part can search on a
                                                          GPU
``hnsw``         ``HNSW32,Flat``                          low single-query latency on CPU; no
                                                          training, no GPU
===============  =======================================  ===========================================

Both IVF presets are sized from the number of vectors N given at build time:

- ``nlist ~ c * sqrt(N)`` (``c`` = :data:`IVFPQ_NLIST_PER_SQRT_N` = 8 for ``ivfpq``,
  :data:`NLIST_PER_SQRT_N` = 4 for ``ivfpq-rflat``), then lowered so that there are >= 39 vectors
  per list (FAISS's own k-means rule of thumb). Below :data:`MIN_IVFPQ_TRAIN` vectors they fall back
  to ``Flat``, since an exact scan of a thousand vectors costs microseconds and k-means on so few
  points is noise.
- k-means trains on a seeded subsample of ``points_per_list * nlist`` vectors (:attr:`IndexPlan.
  train_size`; 20 per list for ``ivfpq``, 40 for ``ivfpq-rflat``), not on all N, where FAISS's own cap
  (256 points per centroid) would take 1M points. At 1M x 512, ``ivfpq`` clusters 160k points into
  8000 lists (about 2.5 minutes of k-means on one core); 40 instead of 20 points per list doubled that
  and changed the share of true neighbours inside the probed lists by < 0.002.
- Why 8 sqrt(N) lists for ``ivfpq``: at 1M x 512 (descriptor-like vectors) a query's true top-10 are
  spread over many lists, and with 4000 lists 97% of them lay in the nearest 64 lists, which hold
  40k vectors (big lists attract queries: 2.2x the mean list size per probe); with 8000 lists 97%
  lay in the nearest 32 lists holding 11k vectors. Scanning 3.5x fewer codes outweighs the doubled
  cost of comparing the query with the centroids (the flat coarse quantizer, ~0.1 ms per query
  per core at 8000 lists, now half the search time): 0.20 against 0.26 ms per query on one core
  at recall@10 0.96.
- ``ivfpq``: ``m`` (sub-quantizers) is the largest divisor of ``dim`` that is <= ``min(128, dim // 4)``
  at 4 bits each, i.e. one bit per dimension, scanned with fast-scan (lookup tables held in SIMD
  registers). The codes only pick candidates and the re-rank gives the precision, but re-ranking is
  the expensive step (~0.35 us per candidate at 1M: a random 512 B read from memory), so codes
  precise enough to need few candidates win: at 1M x 512 with 48 of 8000 lists probed, re-ranking
  the best 80 candidates of PQ128x4fs gave recall@10 0.962, where PQ64x4fs gave 0.928 and needed
  320 candidates for 0.961; at the tuned settings PQ64x4fs was ~1.8x slower. The SQ8 re-rank keeps
  8 bits per dimension, 4x smaller than float32; its score error (~1e-3 at D=512) swaps only
  near-tied neighbours, which caps recall@10 against exact search near 0.98 on descriptor-like data
  (``benchmarks/speed_suite.py``): use ``ivfpq-rflat`` or ``flat`` above that.
- ``ivfpq-rflat``: ``m`` is the largest divisor of ``dim`` that is <= ``min(64, dim // 4)``, ``b`` is
  8 bits, lowered when N < 39 * 256 so each PQ codebook is trainable; ``np`` turns off polysemous
  training, which only serves Hamming prefiltering (unused) and multiplied training time by ~8.

Search parameters (``nprobe`` and the re-rank depth ``k_factor`` for the IVF presets, ``efSearch`` for
``hnsw``) are not fixed here: ``ProductIndex.build`` tunes them for a target recall@k on a sample
of perturbed catalog vectors (or the caller's queries), as autofaiss does (see ``ProductIndex.tune``).
The values below are only the starting point used when tuning is switched off.

Each preset is one entry, :class:`IndexPreset`: its name, description, plan function (how it is built)
and the tuner sweep of its index type (``index.tuning.SWEEPS``). A new preset is one
:func:`register_index_preset` decoration at the end of this module; one of a new index type also needs
``ProductIndex`` to handle that type (add, remove, GPU copy, search parameters) and, if it is approximate,
a sweep in ``index.tuning``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

MIN_IVFPQ_TRAIN = 1000
"""Fewer training vectors than this and the IVF presets become ``Flat``."""

MIN_POINTS_PER_CENTROID = 39
"""FAISS k-means warns below 39 training points per centroid; we size nlist and PQ bits to respect it."""

TRAIN_POINTS_PER_LIST = 40
"""``ivfpq-rflat``'s k-means trains on at most this many vectors per inverted list (a seeded subsample
of the catalog): FAISS's minimum of 39 per centroid. More points barely move IVF centroids but cost
k-means time."""

IVFPQ_TRAIN_POINTS_PER_LIST = 20
"""The same for ``ivfpq``, whose 2x more lists would make 40 per list cost 4x the k-means time; at 1M x
512 the centroids trained on 20 per list put as many true neighbours in the probed lists as 40 did.
(The k-means of :class:`ProductIndex` is told so, so FAISS does not warn about it.)"""

NLIST_PER_SQRT_N = 4
"""``ivfpq-rflat``: nlist ~ this * sqrt(N). Larger nlist scans fewer codes per probe but costs k-means
time (quadratic in nlist with a proportional sample) and centroid comparisons per query; at 300k x 512,
4 sqrt(N) lists gave 22% more QPS than 2 sqrt(N) at equal recall@10."""

IVFPQ_NLIST_PER_SQRT_N = 8
"""``ivfpq``: nlist ~ this * sqrt(N) (see the module docstring: at 1M x 512, 8000 lists gave 1.3x the
QPS of 4000 at recall@10 0.96)."""

MAX_NLIST = 65536
MAX_PQ_SUBQUANTIZERS = 64
"""``ivfpq-rflat``: at most this many 8-bit sub-quantizers."""

MAX_FASTSCAN_SUBQUANTIZERS = 128
"""``ivfpq``: at most this many 4-bit fast-scan sub-quantizers (scan time grows with them)."""

DEFAULT_EF_SEARCH = 64
"""HNSW beam width when not tuned; each search uses max(efSearch, 2 * k) so deep result lists keep recall."""

DEFAULT_REFINE_K_FACTOR = 4
"""IVF presets return k * this candidates, which the re-rank vectors then re-score (when not tuned)."""

MIN_REFINE_CANDIDATES = 64
"""...but never fewer candidates than this when not tuned: for small k, 4k PQ candidates often miss the
true neighbour (PQ distances among near-duplicates are noisy), while re-ranking 64 vectors costs
microseconds. A tuned index stores its own floor, ``min_candidates = k_factor * k`` at the tuned k."""

DEFAULT_TARGET_RECALL = 0.95
"""Recall@k against exact search that ``ProductIndex.build`` tunes approximate presets for."""


@dataclass(frozen=True)
class IndexPlan:
    """What :func:`plan_index` decided for one preset, dim and training-set size.

    Attributes:
        preset: the preset name asked for.
        factory_string: the FAISS factory string to build (may be a fallback, see ``fallback_reason``).
        search_params: starting search-time parameters (``nprobe``, ``k_factor``, ``efSearch``) to store
            in the manifest and apply on load; tuning replaces them.
        fallback_reason: why the factory string is simpler than the preset's usual one, else None.
        train_size: how many of the build vectors to train on (a seeded subsample), or None for all.
        sweep: which search parameters the tuner sweeps on the index this plan builds (a key of
            ``index.tuning.SWEEPS``: ``"ivf"`` nprobe x k_factor, ``"hnsw"`` efSearch), None for an exact
            index (nothing to tune, e.g. a fallback to ``Flat``).
    """

    preset: str
    factory_string: str
    search_params: Dict[str, int] = field(default_factory=dict)
    fallback_reason: Optional[str] = None
    train_size: Optional[int] = None
    sweep: Optional[str] = None


@dataclass(frozen=True)
class IndexPreset:
    """One named preset, the one place that defines it: registered with :func:`register_index_preset`.

    Attributes:
        name: the name given to ``ProductIndex.build(preset=...)`` and ``--preset``.
        description: one line for :func:`describe_index_preset`.
        plan: ``plan(preset, dim, n_train) -> IndexPlan``: how it is built for ``n_train`` vectors of
            dimension ``dim`` (factory string, starting search parameters, training subsample, fallback).
        sweep: which search parameters the tuner sweeps (a key of ``index.tuning.SWEEPS``), None for an
            exact preset; ``plan`` copies it into the plans that build the preset's own index type.
    """

    name: str
    description: str
    plan: Callable[["IndexPreset", int, int], IndexPlan]
    sweep: Optional[str] = None

    @property
    def approximate(self) -> bool:
        """Whether its search parameters trade recall for speed (and so get tuned)."""
        return self.sweep is not None


_PRESETS: Dict[str, IndexPreset] = {}


def register_index_preset(
    name: str, description: Optional[str] = None, sweep: Optional[str] = None
) -> Callable[[Callable[[IndexPreset, int, int], IndexPlan]], Callable[[IndexPreset, int, int], IndexPlan]]:
    """Register the decorated plan function as preset ``name``; a new preset is this one decoration.

    ``description`` None: the plan function's docstring, on one line, describes the preset.

    Example::

        @register_index_preset("hnsw16", "HNSW graph of 16 links per node (HNSW16,Flat)", sweep="hnsw")
        def _plan_hnsw16(preset, dim, n_train):
            return IndexPlan(preset.name, "HNSW16,Flat", {"efSearch": DEFAULT_EF_SEARCH}, sweep=preset.sweep)

    Raises:
        ValueError: ``name`` is already registered.
    """

    def decorator(plan: Callable[[IndexPreset, int, int], IndexPlan]) -> Callable[[IndexPreset, int, int], IndexPlan]:
        if name in _PRESETS:
            raise ValueError(f"index preset {name!r} is registered twice")
        text = description if description is not None else " ".join((plan.__doc__ or "").split())
        _PRESETS[name] = IndexPreset(name, text, plan, sweep)
        return plan

    return decorator


def index_preset(preset: str) -> IndexPreset:
    """The registered entry of ``preset``. Raises ValueError for an unknown name (listing the valid ones)."""
    _check_preset(preset)
    return _PRESETS[preset]


def list_index_presets() -> List[str]:
    """The names accepted by :func:`index_factory_string` and ``ProductIndex.build``, sorted.

    Example:
        >>> list_index_presets()
        ['flat', 'hnsw', 'ivfpq', 'ivfpq-rflat']
    """
    return sorted(_PRESETS)


def describe_index_preset(preset: str) -> str:
    """One line saying what ``preset`` builds. Raises ValueError for an unknown name."""
    return index_preset(preset).description


def index_factory_string(preset: str, dim: int, n_train: int) -> str:
    """The FAISS factory string that ``preset`` builds for ``n_train`` vectors of dimension ``dim``.

    Args:
        preset: one of :func:`list_index_presets`.
        dim: vector dimension D.
        n_train: number of vectors given at build time (the catalog).

    Returns:
        A string for ``faiss.index_factory(dim, s, faiss.METRIC_INNER_PRODUCT)``; for the IVF presets
        on too few vectors this is a fallback (see :func:`plan_index` for the reason).

    Raises:
        ValueError: unknown preset (the message lists the valid names), or dim / n_train < 1.

    Example:
        >>> index_factory_string("ivfpq", dim=512, n_train=1_000_000)
        'IVF8000,PQ128x4fs,Refine(SQ8)'
        >>> index_factory_string("ivfpq-rflat", dim=512, n_train=100_000)
        'IVF1265,PQ64x8np,RFlat'
        >>> index_factory_string("ivfpq", dim=512, n_train=50)
        'Flat'
    """
    return plan_index(preset, dim, n_train).factory_string


def plan_index(preset: str, dim: int, n_train: int) -> IndexPlan:
    """Factory string, search parameters and fallback reason for one preset; see the module docstring."""
    entry = index_preset(preset)
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    return entry.plan(entry, dim, n_train)


# --------------------------------------------------------------------------------------------------
# The presets
# --------------------------------------------------------------------------------------------------


@register_index_preset("flat", "exact inner-product search (Flat)")
def _plan_flat(preset: IndexPreset, dim: int, n_train: int) -> IndexPlan:
    return IndexPlan(preset.name, "Flat")


@register_index_preset("hnsw", "HNSW graph over exact vectors (HNSW32,Flat), CPU only", sweep="hnsw")
def _plan_hnsw(preset: IndexPreset, dim: int, n_train: int) -> IndexPlan:
    return IndexPlan(preset.name, "HNSW32,Flat", {"efSearch": DEFAULT_EF_SEARCH}, sweep=preset.sweep)


@register_index_preset("ivfpq", sweep="ivf")
def _plan_ivfpq(preset: IndexPreset, dim: int, n_train: int) -> IndexPlan:
    """IVF + 4-bit fast-scan PQ re-ranked from 8-bit scalar-quantised vectors
    (IVF{nlist},PQ{m}x4fs,Refine(SQ8)); ~30% of flat's memory, CPU only"""
    if n_train < MIN_IVFPQ_TRAIN:
        return _flat_fallback(preset, n_train)
    nlist, wanted_nlist, train_size = _ivf_lists(n_train, IVFPQ_NLIST_PER_SQRT_N, IVFPQ_TRAIN_POINTS_PER_LIST)
    m = _largest_divisor_at_most(dim, min(MAX_FASTSCAN_SUBQUANTIZERS, max(1, dim // 4)))
    reason = None
    if nlist < wanted_nlist:
        reason = (
            f"preset 'ivfpq' on {n_train} training vectors: nlist {nlist} (wanted {wanted_nlist}) "
            f"so that there are >= {MIN_POINTS_PER_CENTROID} vectors per list"
        )
    return _ivf_plan(preset, f"IVF{nlist},PQ{m}x4fs,Refine(SQ8)", nlist, train_size, reason)


@register_index_preset("ivfpq-rflat", sweep="ivf")
def _plan_ivfpq_rflat(preset: IndexPreset, dim: int, n_train: int) -> IndexPlan:
    """IVF + 8-bit PQ re-ranked from the exact vectors (IVF{nlist},PQ{m}x{bits}np,RFlat);
    exact scores, memory above flat's, IVF-PQ part on GPU when there is one"""
    if n_train < MIN_IVFPQ_TRAIN:
        return _flat_fallback(preset, n_train)
    nlist, wanted_nlist, train_size = _ivf_lists(n_train, NLIST_PER_SQRT_N, TRAIN_POINTS_PER_LIST)
    # b bits per sub-quantizer means 2**b centroids per PQ codebook, each wanting 39 points.
    pq_bits = max(1, min(8, int(math.log2(train_size / MIN_POINTS_PER_CENTROID))))
    m = _largest_divisor_at_most(dim, min(MAX_PQ_SUBQUANTIZERS, max(1, dim // 4)))
    reason = None
    if nlist < wanted_nlist or pq_bits < 8:
        reason = (
            f"preset {preset.name!r} on {n_train} training vectors: nlist {nlist} (wanted {wanted_nlist}) "
            f"and {pq_bits}-bit PQ so that every centroid gets >= {MIN_POINTS_PER_CENTROID} "
            "training points"
        )
    return _ivf_plan(preset, f"IVF{nlist},PQ{m}x{pq_bits}np,RFlat", nlist, train_size, reason)


def _ivf_plan(
    preset: IndexPreset, factory_string: str, nlist: int, train_size: int, reason: Optional[str]
) -> IndexPlan:
    """The plan of an IVF preset's own index: its starting search parameters, k-means sample and sweep."""
    return IndexPlan(
        preset.name,
        factory_string,
        _ivf_search_params(nlist),
        fallback_reason=reason,
        train_size=train_size,
        sweep=preset.sweep,
    )


def _flat_fallback(preset: IndexPreset, n_train: int) -> IndexPlan:
    return IndexPlan(
        preset.name,
        "Flat",
        fallback_reason=(
            f"preset {preset.name!r} needs >= {MIN_IVFPQ_TRAIN} vectors to train, got {n_train}: "
            "using an exact Flat index instead"
        ),
    )


def _ivf_lists(n_train: int, per_sqrt_n: int, points_per_list: int) -> Tuple[int, int, int]:
    """(nlist, the nlist wanted before the >= 39 points per list rule, k-means training-sample size)."""
    wanted_nlist = int(round(per_sqrt_n * math.sqrt(n_train)))
    trainable_nlist = n_train // MIN_POINTS_PER_CENTROID
    nlist = max(1, min(wanted_nlist, trainable_nlist, MAX_NLIST))
    return nlist, wanted_nlist, min(n_train, points_per_list * nlist)


def _ivf_search_params(nlist: int) -> Dict[str, int]:
    # Probing 1/8 of the lists (at least 8) keeps recall@10 high on clustered catalogs when untuned.
    return {
        "nprobe": min(nlist, max(8, nlist // 8)),
        "k_factor": DEFAULT_REFINE_K_FACTOR,
        "min_candidates": MIN_REFINE_CANDIDATES,
    }


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, limit) + 1) if n % d == 0)


def _check_preset(preset: str) -> None:
    if preset not in _PRESETS:
        raise ValueError(f"unknown index preset {preset!r}; valid names: {', '.join(list_index_presets())}")
