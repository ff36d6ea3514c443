"""The street-condition VITON variant: ``viton-street:ROOT``, the `viton:ROOT` set with street queries.

Every VITON person photo is a studio shot; this variant puts each query's person onto procedural clutter
under street conditions (`retrieval.street_conditions`: random scale down to a third of the frame, random
position with partial crops, colour cast, blur, JPEG quality 30-90), using the parse map as the matte.
The catalog (product photos) and the train/validation split are exactly `viton:ROOT`'s (same seed), so
the two specs score the same products and queries and differ only in the query photos. Training pairs
are left as they are (studio photos): training for the street is another step.

The street photos are generated once into the cache directory, in the VITON layout, beside their parse
maps carried through the same geometry (so parser evaluations that look for ``image-parse/`` beside a
query work on them too)::

    <cache_dir>/viton-street/<root name>-<root fingerprint>-seed<seed>-v<version>/
        <half>/image/NNNNNN_0.jpg          the street photo (the encoder's bytes, JPEG quality 30-90)
        <half>/image-parse/NNNNNN_0.png    its LIP labels (grey PNG; 0 off the person)
        COMPLETE-<split>.json              written last: the split's photos are all there

The folder is keyed by the root's contents (names and sizes of its person photos and parse maps), the
seed (which is also the generation seed) and `STREET_FORMAT_VERSION`. Each photo depends only on (seed,
query id, its source files) and is written atomically, so an interrupted generation leaves no marker and
the next load makes only the photos still missing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pandas as pd

from retrieval.datasets.base import (
    PathLike,
    RetrievalSet,
    default_cache_dir,
    logger,
    register_dataset_format,
    run_in_threads,
)
from retrieval.datasets.viton import VITON_HALVES, _listing, load_viton

STREET_FOLDER = "viton-street"
# Street copies of training pairs are drawn from seeds 1000+ (plus the run's seed); the validation variant uses
# the load seed (0 by default), so training never sees the evaluated draws.
STREET_TRAINING_SEED = 1000
#: The frame scale of ``viton-street-hr:ROOT``: the frame is 3x the studio photo (768 x 576 for VITON's 256 x 192),
#: so a person at the smallest scale (a third of the frame height) keeps the studio photo's resolution.
HIGH_RESOLUTION_FRAME_SCALE = 3.0


def _root_fingerprint(root: Path) -> str:
    """SHA-1 of the names and sizes of the person photos and parse maps of `root` (both halves)."""
    digest = hashlib.sha1()
    for half in VITON_HALVES:
        for folder in ("image", "image-parse"):
            for stem, path in _listing(root / half / folder).items():
                digest.update(f"{half}/{folder}/{path.name} {path.stat().st_size}\n".encode("utf-8"))
    return digest.hexdigest()


def _variant_folder(root: Path, fingerprint: str, seed_part: str, frame_scale: float) -> str:
    """The cache folder name of one variant; frame scale 1 keeps the name it had before frame scales existed."""
    from retrieval.street_conditions import STREET_FORMAT_VERSION

    scale = "" if frame_scale == 1.0 else f"-frame{frame_scale:g}x"
    return f"{root.name}-{fingerprint[:12]}-{seed_part}{scale}-v{STREET_FORMAT_VERSION}"


def _marker_content(
    root: Path, fingerprint: str, split: str, seed: int, query_ids: List[str], frame_scale: float
) -> Dict[str, object]:
    from retrieval.street_conditions import STREET_FORMAT_VERSION

    content = {
        "format_version": STREET_FORMAT_VERSION,
        "generator": "retrieval.datasets.viton_street.load_viton_street",
        "root": str(root),
        "root_fingerprint": fingerprint,
        "split": split,
        "seed": int(seed),
        "queries": len(query_ids),
        "query_ids_sha1": hashlib.sha1("\n".join(query_ids).encode("utf-8")).hexdigest(),
    }
    if frame_scale != 1.0:
        content["frame_scale"] = float(frame_scale)
    return content


def _street_paths(target: Path, root: Path, person_image: str) -> Tuple[Path, Path]:
    """(street photo, its parse map) of a studio photo <root>/<half>/image/<stem>.<ext>."""
    relative = Path(person_image).relative_to(root)
    half, stem = relative.parts[0], relative.stem
    return target / half / "image" / f"{stem}.jpg", target / half / "image-parse" / f"{stem}.png"


def _source_parse(root: Path, person_image: str, listings: Dict[str, Dict[str, Path]]) -> Optional[Path]:
    """The parse map beside a studio photo (<root>/<half>/image-parse/<stem>.*), or None."""
    relative = Path(person_image).relative_to(root)
    half = relative.parts[0]
    if half not in listings:
        listings[half] = _listing(root / half / "image-parse")
    return listings[half].get(relative.stem)


def _make_street_photo(
    seed: int, query_id: str, person_image: str, parse: Optional[Path], out_image, out_parse, frame_scale: float
):
    """Generate and write one street photo and its parse map (parse map first: the photo marks it done)."""
    from retrieval.files import write_bytes_atomic, write_image_atomic
    from retrieval.io import read_image, read_mask
    from retrieval.street_conditions import street_version

    labels = None if parse is None else read_mask(parse)
    photo = street_version(read_image(person_image), labels, seed, query_id, frame_scale=frame_scale)
    if photo.labels is not None:
        write_image_atomic(out_parse, photo.labels, compress_level=1)
    write_bytes_atomic(out_image, photo.jpeg)


def make_street_queries(
    root: PathLike,
    queries,
    target: PathLike,
    seed: int = 0,
    workers: Optional[int] = None,
    frame_scale: float = 1.0,
) -> List[str]:
    """Write the street version of every query photo of a VITON root into `target`; return their paths.

    Photos already there are kept (each was written atomically, so a file that exists is whole): an
    interrupted run resumes. Query photos without a parse map get `studio_matte` (a warning says how many).

    Args:
        root: the VITON root the query photos are under.
        queries: a queries table (query_id, image); repeated query ids are made once.
        target: the variant's folder.
        seed: the generation seed.
        workers: threads (default min(8, CPUs)); numpy, OpenCV and the codecs release the GIL.
        frame_scale: the frame's size over the studio photo's (`street_version`).

    Returns:
        The street photo of each row of `queries`, as absolute path strings, in row order.
    """
    root, target = Path(root).resolve(), Path(target).resolve()
    listings: Dict[str, Dict[str, Path]] = {}
    jobs = {}
    for query_id, image in zip(queries["query_id"], queries["image"]):
        if query_id not in jobs:
            jobs[query_id] = (image, _source_parse(root, image, listings), *_street_paths(target, root, image))
    no_parse = sum(parse is None for _, parse, _, _ in jobs.values())
    if no_parse:
        logger.warning(
            "%s: %d of %d query photos have no parse map; matted by their white background", root, no_parse, len(jobs)
        )
    missing = [(query_id, job) for query_id, job in jobs.items() if not job[2].is_file()]
    if missing:
        logger.info("generating %d street photos (of %d) into %s", len(missing), len(jobs), target)
        for folder in {job[2].parent for _, job in missing} | {job[3].parent for _, job in missing}:
            folder.mkdir(parents=True, exist_ok=True)

        def make(item) -> None:
            query_id, (image, parse, out_image, out_parse) = item
            _make_street_photo(seed, str(query_id), image, parse, out_image, out_parse, frame_scale)

        run_in_threads(make, missing, workers)
    return [str(jobs[query_id][2]) for query_id in queries["query_id"]]


def load_viton_street(
    root: PathLike,
    split: str = "val",
    seed: int = 0,
    cache_dir: Optional[PathLike] = None,
    frame_scale: float = 1.0,
) -> RetrievalSet:
    """`load_viton` of `root` with every query photo replaced by its street version (generated once).

    Args:
        root: the VITON root.
        split: "val", "train" or "all", as `load_viton` (the same seeded split).
        seed: seed of the split and of the street conditions.
        cache_dir: where the variant is generated; default `default_cache_dir()`.
        frame_scale: the street frame's size over the studio photo's (`street_version`); 1 for
            ``viton-street:``, `HIGH_RESOLUTION_FRAME_SCALE` for ``viton-street-hr:``.

    Returns:
        A validated RetrievalSet: `load_viton`'s catalog and training pairs (studio photos), queries pointing
        at the street photos; `root` is the VITON root.

    Raises:
        As `load_viton`.
    """
    studio = load_viton(root, split=split, seed=seed)
    root = studio.root
    # Imported here: the drawing pulls in OpenCV, and the codecs torch, which loading a table never needs.
    from retrieval.files import write_text_atomic

    cache = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()).resolve()

    fingerprint = _root_fingerprint(root)
    target = cache / STREET_FOLDER / _variant_folder(root, fingerprint, f"seed{seed}", frame_scale)
    query_ids = [str(query_id) for query_id in dict.fromkeys(studio.queries["query_id"])]
    expected = _marker_content(root, fingerprint, split, seed, query_ids, frame_scale)
    marker = target / f"COMPLETE-{split}.json"
    queries = studio.queries.copy()
    if marker.is_file() and json.loads(marker.read_text()) == expected:
        queries["image"] = [str(_street_paths(target, root, image)[0]) for image in queries["image"]]
    else:
        queries["image"] = make_street_queries(root, studio.queries, target, seed=seed, frame_scale=frame_scale)
        write_text_atomic(marker, json.dumps(expected, indent=2, sort_keys=True) + "\n")
    data = RetrievalSet(
        name=f"{'viton-street' if frame_scale == 1.0 else 'viton-street-hr'}:{root} [{split}"
        + (f", split seed {seed}]" if seed else "]"),
        catalog=studio.catalog,
        queries=queries,
        train=studio.train,
        root=root,
    )
    return data.validate()


def street_training_pairs(
    dataset: RetrievalSet, copies: int, seed: int = 0, cache_dir: Optional[PathLike] = None
) -> pd.DataFrame:
    """`dataset.train` followed by `copies` street versions of every pair (person photo and parse map replaced).

    For training descriptors and proxies for the street: copy c is drawn with seed
    `STREET_TRAINING_SEED + seed + c`, apart from the validation variant's draws (seeded by the load seed),
    and generated once into the cache like the variant.

    Raises:
        ValueError: the dataset has no training pairs, or no VITON root to find them under.
    """
    if dataset.train is None or dataset.train.empty:
        raise ValueError(f"{dataset.name} has no training pairs to make street copies of")
    if dataset.root is None:
        raise ValueError(f"{dataset.name} has no VITON root: street copies need the parse maps of its layout")
    root = Path(dataset.root).resolve()
    cache = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()).resolve()
    fingerprint = _root_fingerprint(root)
    train = dataset.train.reset_index(drop=True)
    tables = [train]
    for copy in range(int(copies)):
        copy_seed = STREET_TRAINING_SEED + int(seed) + copy
        target = cache / STREET_FOLDER / _variant_folder(root, fingerprint, f"train-seed{copy_seed}", 1.0)
        stems = [Path(str(image)).stem for image in train["person_image"]]  # the per-image draw's id
        rows = pd.DataFrame({"query_id": stems, "image": train["person_image"]})
        street = train.copy()
        street["person_image"] = make_street_queries(root, rows, target, seed=copy_seed)
        if "parse" in street.columns:
            street["parse"] = [str(_street_paths(target, root, image)[1]) for image in train["person_image"]]
        tables.append(street)
    return pd.concat(tables, ignore_index=True)


@register_dataset_format("viton-street", "viton-street:ROOT")
def viton_street_spec(
    argument: str, *, spec: str, split: str, seed: int, cache_dir: Optional[PathLike]
) -> RetrievalSet:
    """``viton-street:ROOT``: `load_viton_street` of ROOT, generated into ``cache_dir`` with the load seed."""
    if not argument:
        raise ValueError(f"bad dataset spec {spec!r}: expected viton-street:ROOT, the directory of a VITON-layout set")
    return load_viton_street(argument, split=split, seed=seed, cache_dir=cache_dir)


@register_dataset_format("viton-street-hr", "viton-street-hr:ROOT")
def viton_street_hr_spec(
    argument: str, *, spec: str, split: str, seed: int, cache_dir: Optional[PathLike]
) -> RetrievalSet:
    """``viton-street-hr:ROOT``: the street variant in a frame 3x the studio photo (768 x 576 for VITON), so the
    person keeps the studio photo's resolution at the smallest scale: what a phone photo of a passer-by holds."""
    if not argument:
        raise ValueError(
            f"bad dataset spec {spec!r}: expected viton-street-hr:ROOT, the directory of a VITON-layout set"
        )
    return load_viton_street(
        argument, split=split, seed=seed, cache_dir=cache_dir, frame_scale=HIGH_RESOLUTION_FRAME_SCALE
    )
