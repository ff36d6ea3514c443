"""Local features under known transforms: our torch SURF (`retrieval.surf`) against OpenCV SIFT.

What it measures, on seeded synthetic street photos (`retrieval.synthetic`) and, when the folder
exists, a few real VITON product photos (read from ``../shared/data/viton``, never copied):

- detection repeatability under known rotations, scalings and random homographies: a keypoint is
  repeated when its position mapped by the known transform lies within 2.5 px of a detection in the
  other image; only keypoints whose mapped position falls inside the other image (minus a margin)
  count. Repeatability = repeated keypoints of both images / counted keypoints of both images.
- descriptor matching: mutual nearest neighbours (L2) between the two images' descriptors
  (SURF-64; RootSIFT for SIFT); precision = share of matches that the transform confirms within 3 px.
- Hessian agreement: our box-filter det(H) at the first octave (filter sides 9, 15, 21, 27) against
  the scale-normalised Gaussian one, ``sigma^4 (Lxx Lyy - Lxy^2)`` with scipy's Gaussian derivatives at
  the paper's ``sigma = 1.2 L / 9`` and at the best-correlating ``sigma = k L / 9``: Pearson
  correlation over the pixels where the filter fits, and the relative error at our detected maxima
  after a gain (box filters are normalised by their area, Gaussians by sigma^2), with the share of
  those maxima where the Gaussian det is not even positive (saddles and oblique edges, to which the
  box approximation responds).
- CPU speed: images/s of SURF detect+describe (batched torch) and of OpenCV SIFT detect+compute (one
  call per image), on the same 256x192 images, with the process's current thread settings.

Both detectors see the same uint8 grey images and keep at most the same number of keypoints, the
strongest by their own response. Pure functions; `format_local_eval` prints the tables.

Example:
    >>> results = run_local_eval(n_synthetic=2, viton_root=None)  # doctest: +SKIP
    >>> print(format_local_eval(results))  # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from retrieval.descriptors.sift import SIFT, rgb_to_grey_uint8
from retrieval.descriptors.surf import SURF
from retrieval.io import read_image, resize_image
from retrieval.surf import (
    BASE_FILTER_SIZE,
    BASE_SIGMA,
    box_hessian_response,
    integral_image,
    scale_space_maxima,
    surf,
    surf_filter_sizes,
)
from retrieval.synthetic import make_synthetic_product

DEFAULT_SIZE = (256, 192)
REPEAT_TOLERANCE_PX = 2.5
MATCH_TOLERANCE_PX = 3.0
#: Keypoints within this many pixels of the other image's border are not counted (warps leave a
#: border of filled pixels whose edges both detectors respond to).
BORDER_MARGIN_PX = 8.0


# ---- images and transforms -----------------------------------------------------------------------
def evaluation_images(
    n_synthetic: int = 6,
    seed: int = 0,
    size: Tuple[int, int] = DEFAULT_SIZE,
    viton_root: Optional[Path] = None,
    n_viton: int = 6,
) -> Dict[str, List[np.ndarray]]:
    """Base images per source: seeded synthetic street photos, and VITON product photos when present.

    VITON photos are spread evenly over the sorted ``train/cloth`` listing (deterministic).

    Returns:
        {"synthetic": [...], "viton": [...] (only when the folder exists)}, (H, W, 3) uint8 RGB.
    """
    sources = {"synthetic": [make_synthetic_product(i, seed=seed, size=size)["street"] for i in range(n_synthetic)]}
    cloth = Path(viton_root) / "train" / "cloth" if viton_root is not None else None
    if cloth is not None and cloth.is_dir() and n_viton > 0:
        paths = sorted(cloth.glob("*.jpg"))
        if paths:
            picks = np.linspace(0, len(paths) - 1, num=min(n_viton, len(paths))).round().astype(int)
            sources["viton"] = [resize_image(read_image(paths[i]), size) for i in picks]
    return sources


def known_transforms(
    size: Tuple[int, int] = DEFAULT_SIZE, seed: int = 0, n_homographies: int = 3
) -> List[Tuple[str, np.ndarray]]:
    """Named 3x3 homographies mapping pixel xy of the base image to the transformed one.

    Rotations of 15, 30, 45 and 90 degrees and scalings by 0.7 and 1.4 about the image centre, and
    random homographies moving each image corner by up to 15% of the image size (seeded).
    """
    height, width = size
    centre = ((width - 1) / 2.0, (height - 1) / 2.0)
    transforms = []
    for angle in (15, 30, 45, 90):
        transforms.append((f"rotate {angle}", np.vstack([cv2.getRotationMatrix2D(centre, angle, 1.0), [0, 0, 1]])))
    for scale in (0.7, 1.4):
        transforms.append((f"scale {scale}", np.vstack([cv2.getRotationMatrix2D(centre, 0.0, scale), [0, 0, 1]])))
    rng = np.random.default_rng(seed)
    corners = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], np.float32)
    for k in range(n_homographies):
        jitter = rng.uniform(-0.15, 0.15, size=(4, 2)) * np.array([width, height])
        matrix = cv2.getPerspectiveTransform(corners, (corners + jitter).astype(np.float32))
        transforms.append((f"homography {k + 1}", matrix))
    return transforms


def warp_image(image: np.ndarray, homography: np.ndarray) -> np.ndarray:
    """Warp an (H, W, 3) image into a frame of the same size (bilinear, mirrored border)."""
    height, width = image.shape[:2]
    return cv2.warpPerspective(
        image, homography, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )


def map_points(points: np.ndarray, homography: np.ndarray) -> np.ndarray:
    """(N, 2) xy -> (N, 2) xy through a 3x3 homography."""
    if len(points) == 0:
        return points.reshape(0, 2)
    mapped = cv2.perspectiveTransform(points.reshape(-1, 1, 2).astype(np.float64), homography)
    return mapped.reshape(-1, 2)


def inside(points: np.ndarray, size: Tuple[int, int], margin: float = BORDER_MARGIN_PX) -> np.ndarray:
    """(N,) bool: xy lies in the (H, W) frame at least `margin` pixels from its border."""
    height, width = size
    return (
        (points[:, 0] >= margin)
        & (points[:, 0] <= width - 1 - margin)
        & (points[:, 1] >= margin)
        & (points[:, 1] <= height - 1 - margin)
    )


# ---- features ------------------------------------------------------------------------------------
Features = List[Tuple[np.ndarray, np.ndarray]]  # per image: (keypoints (N, 2) xy, descriptors (N, D))


def surf_features(images: Sequence[np.ndarray], max_keypoints: int, batch_size: int = 16, **surf_conf: Any) -> Features:
    """Our SURF on the uint8 grey images OpenCV SIFT sees; `surf_conf` overrides SURF's defaults."""
    conf = {
        key: SURF.default_conf[key] for key in ("hessian_threshold", "n_octaves", "initial_step", "extended", "upright")
    }
    conf.update(surf_conf)
    out: Features = []
    for start in range(0, len(images), batch_size):
        grey = rgb_to_grey_uint8(_to_tensor(images[start : start + batch_size]))
        feats = surf(torch.from_numpy(grey).float() / 255.0, max_keypoints=max_keypoints, **conf)
        for keypoints, desc, mask in zip(feats.keypoints, feats.descriptors, feats.mask):
            out.append((keypoints[mask].numpy().astype(np.float64), desc[mask].numpy()))
    return out


def sift_features(images: Sequence[np.ndarray], max_keypoints: int, batch_size: int = 16) -> Features:
    """OpenCV SIFT (the project's `sift` descriptor: contrast threshold 0.02, RootSIFT)."""
    sift = SIFT(max_keypoints=max_keypoints)
    out: Features = []
    for start in range(0, len(images), batch_size):
        feats = sift.extract(_to_tensor(images[start : start + batch_size]))
        for keypoints, desc, mask in zip(feats.keypoints, feats.desc, feats.mask):
            out.append((keypoints[mask].numpy().astype(np.float64), desc[mask].numpy()))
    return out


def _to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


# ---- scores --------------------------------------------------------------------------------------
def repeatability(
    points_a: np.ndarray,
    points_b: np.ndarray,
    homography: np.ndarray,
    size: Tuple[int, int],
    tolerance: float = REPEAT_TOLERANCE_PX,
    margin: float = BORDER_MARGIN_PX,
) -> Tuple[float, int]:
    """Symmetric repeatability of two keypoint sets under a known homography (a -> b).

    Returns:
        (repeated keypoints of a and b / counted keypoints of a and b, counted keypoints); NaN when
        none is counted. Counted: keypoints whose mapped position lies inside the other frame.
    """
    a_in_b = map_points(points_a, homography)
    b_in_a = map_points(points_b, np.linalg.inv(homography))
    keep_a, keep_b = inside(a_in_b, size, margin), inside(b_in_a, size, margin)
    a_in_b, b_common, b_in_a, a_common = a_in_b[keep_a], points_b[keep_b], b_in_a[keep_b], points_a[keep_a]
    counted = len(a_in_b) + len(b_common)
    if counted == 0:
        return float("nan"), 0
    if len(a_in_b) == 0 or len(b_common) == 0:
        return 0.0, counted
    repeated_a = (_pairwise_distances(a_in_b, b_common).min(axis=1) <= tolerance).sum()
    repeated_b = (_pairwise_distances(b_in_a, a_common).min(axis=1) <= tolerance).sum()
    return float(repeated_a + repeated_b) / counted, counted


def mutual_nearest_neighbours(desc_a: np.ndarray, desc_b: np.ndarray) -> np.ndarray:
    """(M, 2) index pairs (i, j): j is i's nearest descriptor in b (L2) and i is j's nearest in a."""
    if len(desc_a) == 0 or len(desc_b) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    distances = _pairwise_distances(desc_a.astype(np.float64), desc_b.astype(np.float64))
    a_to_b, b_to_a = distances.argmin(axis=1), distances.argmin(axis=0)
    mutual = b_to_a[a_to_b] == np.arange(len(desc_a))
    return np.stack([np.flatnonzero(mutual), a_to_b[mutual]], axis=1)


def matching_precision(
    features_a: Tuple[np.ndarray, np.ndarray],
    features_b: Tuple[np.ndarray, np.ndarray],
    homography: np.ndarray,
    size: Tuple[int, int],
    tolerance: float = MATCH_TOLERANCE_PX,
    margin: float = BORDER_MARGIN_PX,
) -> Tuple[int, int]:
    """(correct, total) mutual-NN matches among keypoints of the common region (see `repeatability`)."""
    (points_a, desc_a), (points_b, desc_b) = features_a, features_b
    keep_a = inside(map_points(points_a, homography), size, margin)
    keep_b = inside(map_points(points_b, np.linalg.inv(homography)), size, margin)
    points_a, desc_a, points_b, desc_b = points_a[keep_a], desc_a[keep_a], points_b[keep_b], desc_b[keep_b]
    pairs = mutual_nearest_neighbours(desc_a, desc_b)
    if len(pairs) == 0:
        return 0, 0
    errors = np.linalg.norm(map_points(points_a[pairs[:, 0]], homography) - points_b[pairs[:, 1]], axis=1)
    return int((errors <= tolerance).sum()), len(pairs)


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))


def gaussian_hessian_determinant(grey: np.ndarray, sigma: float) -> np.ndarray:
    """Scale-normalised det of the Gaussian Hessian, ``sigma^4 (Lxx Lyy - Lxy^2)``, of an (H, W) image.

    The reference the box filters approximate (scipy's sampled Gaussian derivatives, reflected border).
    """
    image = grey.astype(np.float64)
    lxx = ndimage.gaussian_filter(image, sigma, order=(0, 2))  # order is per axis: (rows, columns)
    lyy = ndimage.gaussian_filter(image, sigma, order=(2, 0))
    lxy = ndimage.gaussian_filter(image, sigma, order=(1, 1))
    return sigma**4 * (lxx * lyy - lxy**2)


def hessian_agreement(
    greys: Sequence[np.ndarray],
    hessian_threshold: float,
    sigma_factors: Sequence[float] = tuple(np.arange(1.0, 2.01, 0.1)),
) -> List[Dict[str, float]]:
    """Box-filter vs Gaussian det(H) at the first octave's filter sizes, step 1 (see the module docstring).

    For each filter side L the Gaussian reference is taken at the paper's sigma = 1.2 L / 9 and at
    the sigma = k L / 9 (k in `sigma_factors`) that correlates best with the box response: the box
    filters are wider than the paper's sigma says, and the scan shows by how much.

    At the maxima the box detector finds (3x3x3 over the four sizes, above `hessian_threshold`;
    they exist at L = 15 and 21 only), the gain between box and Gaussian responses is the median
    ratio there, and the relative error is ``|box - gain * gaussian| / |gain * gaussian|``.

    Args:
        greys: (H, W) float images in [0, 1].
        hessian_threshold: threshold of the maxima at which the relative error is measured.

    Returns:
        One row per filter size.
    """
    batch = torch.from_numpy(np.stack(greys)).double()
    integral = integral_image(batch)
    sizes = surf_filter_sizes(0)
    boxes, valids = [], []
    for size in sizes:
        det, _, valid = box_hessian_response(integral, size, step=1)
        boxes.append(det.double().numpy())
        valids.append(valid)
    responses = torch.from_numpy(np.stack(boxes, axis=1)).float().masked_fill(~torch.stack(valids)[None], float("-inf"))
    maxima = scale_space_maxima(responses, hessian_threshold).numpy()  # (b, interval, y, x)
    rows = []
    for interval, size in enumerate(sizes):
        valid, box = valids[interval].numpy(), boxes[interval]
        references = {
            k: np.stack([gaussian_hessian_determinant(g, k * size / BASE_FILTER_SIZE) for g in greys])
            for k in sigma_factors
        }
        references[BASE_SIGMA] = np.stack(
            [gaussian_hessian_determinant(g, BASE_SIGMA * size / BASE_FILTER_SIZE) for g in greys]
        )
        correlations = {
            k: float(np.corrcoef(ref[:, valid].ravel(), box[:, valid].ravel())[0, 1]) for k, ref in references.items()
        }
        best = max(sigma_factors, key=lambda k: correlations[k])
        at = maxima[maxima[:, 1] == interval]
        row = {
            "filter L": size,
            "corr @1.2L/9": correlations[BASE_SIGMA],
            "best k": float(best),
            "corr @best": correlations[best],
            "maxima": int(len(at)),
        }
        for label, k in (("1.2L/9", BASE_SIGMA), ("best", best)):
            if len(at):
                box_at = box[at[:, 0], at[:, 2], at[:, 3]]
                reference_at = references[k][at[:, 0], at[:, 2], at[:, 3]]
                gain = float(np.median(box_at / reference_at))
                relative = np.abs(box_at - gain * reference_at) / np.maximum(np.abs(gain * reference_at), 1e-12)
                row[f"med rel err @{label}"] = float(np.median(relative))
                row[f"gauss det<=0 @{label}"] = float((reference_at <= 0).mean())
            else:
                row[f"med rel err @{label}"] = row[f"gauss det<=0 @{label}"] = float("nan")
        rows.append(row)
    return rows


def extraction_speed(
    images: Sequence[np.ndarray], max_keypoints: int, repeats: int = 3, batch_size: int = 16
) -> Dict[str, Any]:
    """Images/s of SURF (ours) and OpenCV SIFT extraction on the same images: wall clock and CPU.

    Best of `repeats` runs each. Wall-clock speed is what a user waits for; CPU time (of all the
    process's threads) is what the work costs, and stays meaningful on a machine shared with other
    jobs, where wall-clock numbers swing with the load.
    """

    def best(run: Callable[[], Any]) -> Tuple[float, float]:
        run()  # warm-up: first-call allocations, OpenCV thread pool
        walls, cpus = [], []
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        return len(images) / min(walls), len(images) / min(cpus)

    surf_wall, surf_cpu = best(lambda: surf_features(images, max_keypoints, batch_size))
    sift_wall, sift_cpu = best(lambda: sift_features(images, max_keypoints, batch_size))
    return {
        "images": len(images),
        "size": f"{images[0].shape[0]}x{images[0].shape[1]}",
        "torch threads": torch.get_num_threads(),
        "opencv threads": cv2.getNumThreads(),
        "surf img/s": surf_wall,
        "sift img/s": sift_wall,
        "surf/sift (wall)": surf_wall / sift_wall,
        "surf img/cpu-s": surf_cpu,
        "sift img/cpu-s": sift_cpu,
        "surf/sift (cpu)": surf_cpu / sift_cpu,
    }


# ---- the whole evaluation ------------------------------------------------------------------------
def run_local_eval(
    size: Tuple[int, int] = DEFAULT_SIZE,
    seed: int = 0,
    max_keypoints: int = 500,
    n_homographies: int = 3,
    speed_repeats: int = 3,
    **image_sources: Any,
) -> Dict[str, Any]:
    """Repeatability, matching precision, Hessian agreement and speed (see the module docstring).

    ``image_sources`` (n_synthetic, viton_root, n_viton) choose the base images, as `evaluation_images`.

    Returns:
        {"repeatability": rows, "matching": rows, "hessian": rows, "speed": dict, "settings": dict},
        rows being dicts (source, transform, detector, ...) for `format_local_eval`.
    """
    sources = evaluation_images(seed=seed, size=size, **image_sources)
    transforms = known_transforms(size, seed, n_homographies)
    extractors = {
        "SURF (ours)": lambda ims: surf_features(ims, max_keypoints),
        "SIFT (OpenCV)": lambda ims: sift_features(ims, max_keypoints),
    }
    repeat_rows, match_rows = [], []
    for source, images in sources.items():
        base = {name: extract(images) for name, extract in extractors.items()}
        for transform, homography in transforms:
            warped = [warp_image(image, homography) for image in images]
            for name, extract in extractors.items():
                moved = extract(warped)
                scores = [repeatability(a[0], b[0], homography, size) for a, b in zip(base[name], moved)]
                matches = [matching_precision(a, b, homography, size) for a, b in zip(base[name], moved)]
                correct, total = sum(c for c, _ in matches), sum(t for _, t in matches)
                repeat_rows.append(
                    {
                        "source": source,
                        "transform": transform,
                        "detector": name,
                        "repeatability": float(np.nanmean([r for r, _ in scores])),
                        "counted kp/img": float(np.mean([n for _, n in scores])) / 2,
                    }
                )
                match_rows.append(
                    {
                        "source": source,
                        "transform": transform,
                        "detector": name,
                        "precision": correct / total if total else float("nan"),
                        "correct/img": correct / len(images),
                        "matches/img": total / len(images),
                    }
                )
    all_images = [image for images in sources.values() for image in images]
    greys = [g.astype(np.float64) / 255.0 for g in rgb_to_grey_uint8(_to_tensor(all_images))]
    return {
        "repeatability": repeat_rows,
        "matching": match_rows,
        "hessian": hessian_agreement(greys, SURF.default_conf["hessian_threshold"]),
        "speed": extraction_speed(all_images, max_keypoints, speed_repeats),
        "settings": {
            "sources": {k: len(v) for k, v in sources.items()},
            "size": size,
            "max_keypoints": max_keypoints,
            "surf hessian_threshold": SURF.default_conf["hessian_threshold"],
            "sift contrast_threshold": SIFT.default_conf["contrast_threshold"],
            "repeat tolerance px": REPEAT_TOLERANCE_PX,
            "match tolerance px": MATCH_TOLERANCE_PX,
            "border margin px": BORDER_MARGIN_PX,
        },
    }


def format_local_eval(results: Dict[str, Any]) -> str:
    """Plain-text tables of a `run_local_eval` result: the two detectors side by side."""
    settings = results["settings"]
    lines = [
        "local features: SURF (ours, torch) vs SIFT (OpenCV) -- " + ", ".join(f"{k}={v}" for k, v in settings.items())
    ]

    def side_by_side(rows: List[Dict], value: str, extra: str) -> str:
        frame = pd.DataFrame(rows)
        table = frame.pivot_table(index=["source", "transform"], columns="detector", values=[value, extra], sort=False)
        means = frame.groupby(["source", "detector"], sort=False)[[value, extra]].mean()
        mean_rows = means.unstack("detector")
        mean_rows.index = pd.MultiIndex.from_tuples(
            [(s, "mean") for s in mean_rows.index], names=["source", "transform"]
        )
        table = pd.concat([table, mean_rows]).sort_index(level=0, sort_remaining=False, kind="stable")
        return table.to_string(float_format=lambda v: f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}")

    lines += [
        "",
        f"detection repeatability (within {settings['repeat tolerance px']} px, common region)",
        side_by_side(results["repeatability"], "repeatability", "counted kp/img"),
    ]
    lines += [
        "",
        f"descriptor matching: mutual nearest neighbours, precision within {settings['match tolerance px']} px",
        side_by_side(results["matching"], "precision", "correct/img"),
    ]
    lines += [
        "",
        "Hessian agreement, first octave: box det(H) vs sigma^4 det(H) of Gaussian derivatives at "
        "sigma = 1.2 L / 9 (paper) and k L / 9 (best)",
        pd.DataFrame(results["hessian"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"),
    ]
    speed = results["speed"]
    lines += [
        "",
        "CPU extraction speed (detect + describe)",
        "  " + ", ".join(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}" for k, v in speed.items()),
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m benchmarks.local_eval [VITON_ROOT]
    import sys

    root = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).resolve().parents[1].parent / "shared" / "data" / "viton"
    )
    print(format_local_eval(run_local_eval(viton_root=root)))
