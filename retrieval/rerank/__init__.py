"""Spatial verification: re-rank a first stage's top products by geometrically consistent matches.

For a query and each of its top-N products (Philbin et al., "Object retrieval with large vocabularies
and fast spatial matching", CVPR 2007; DELF uses the same step):

1. `mutual_nearest_neighbours`: descriptor matches that are each other's nearest neighbour, for all
   N candidates in one batched matrix product.
2. `ransac`: a geometric model (similarity, affine or homography) fitted to those matches by RANSAC,
   batched over the N candidates *and* the hypotheses: every candidate gets the same number of
   minimal-sample hypotheses, solved as one batch of small linear systems, all scored at once,
   then the best one re-fitted by least squares on its inliers (one local-optimisation step).
3. `SpatialVerifier.rerank`: new score = global similarity + ``inlier_weight`` * log(1 + inliers)
   (inliers below ``min_inliers`` count 0), sorted; the first stage's order survives among the
   products that nothing verified. The logarithm because the evidence of the 50th inlier is not
   that of the 5th, and because chance inliers of unrelated images (a few) must not outweigh the
   global similarity. The weight decides who leads: the default 0.05 (chosen on a VITON
   validation subset with DELF) lets verification break near-ties of the global similarity, which
   is what helps when street and shop photos share few exact geometric matches; a large weight
   (e.g. 10) gives classic verification, where the most inliers win outright (rigid objects,
   precise keypoints such as SIFT's).

Two RANSAC back-ends, same contract (`ransac`, `ransac_opencv`), chosen by ``backend``:
- "opencv": `cv2.estimateAffinePartial2D` / `estimateAffine2D` / `findHomography`, one call per
  candidate. The default on a CPU, because OpenCV stops as soon as the inlier ratio it has seen
  makes more hypotheses pointless: measured here (2 shared cores, 50 candidates x ~90 matches), about
  4 ms per query against 80-300 ms for the fixed-size torch batch and ~13 s for kornia's `RANSAC`
  (one pair per call, homography/fundamental only, which is why it is not used at all).
- "torch": our batched RANSAC, every candidate's hypotheses solved and scored in a few tensor
  operations of size candidates x hypotheses x matches; it follows the device of its inputs, so
  it is the choice when the features are on a GPU ("auto" picks it there), and it can reject
  implausible hypotheses (scale change, mirroring) inside the loop.

Works with any descriptor whose `extract` returns `LocalFeatures` (sift, delf, ...): the gallery's
local features live in a `LocalFeatureStore` (padded tensors, float16 descriptors), built from the
catalog by the same descriptor and saved as bytes (an index attachment).

The modules: `matching` (step 1), `ransac` (step 2: the geometric models, both back-ends), `store`
(`LocalFeatureStore`), `verifier` (step 3, `SpatialVerifier`).
"""

from retrieval.rerank.matching import mutual_nearest_neighbours
from retrieval.rerank.ransac import MODELS, ransac, ransac_opencv, solve_small_systems, transfer_error
from retrieval.rerank.store import LocalFeatureStore
from retrieval.rerank.verifier import SpatialVerifier

__all__ = [
    "MODELS",
    "LocalFeatureStore",
    "SpatialVerifier",
    "mutual_nearest_neighbours",
    "ransac",
    "ransac_opencv",
    "solve_small_systems",
    "transfer_error",
]
