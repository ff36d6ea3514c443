"""The embedded synthetic street-to-shop set: seeded, generated in seconds, in the VITON layout.

Every product is a procedurally drawn top (t-shirt, long sleeve, tank or sweater silhouette) with its
own texture (solid colour, stripes, polka dots, checks, camouflage, gradient, optionally a printed
logo) on white: the "shop" photo. Its "street" photo is the same garment worn by a person-like
figure: the product photo is warped onto the torso (random perspective, rotation and a non-rigid
waist squeeze with small wrinkles), re-lit (gain, gamma, colour cast, light gradient), partly occluded
(an arm across the body, a bag, hair), over a cluttered background (gradients, rectangles, discs,
lines, noise), with the human-parsing label map of the figure (LIP labels, as in VITON).

The task is meant to be like the real one in kind: retrieval on raw street photos is imperfect (the
background, skin, hair and pants dominate a global colour statistic, the garment is deformed and
re-lit) but far above chance; isolating the garment (labels 5) helps, which is what the proxy stages
of the project are for.

Files are PNG (lossless, byte-identical for a seed); product `i` depends only on (seed, i), so a
larger set extends a smaller one with the same seed. Generation writes into a temporary directory and
renames it into place last, so an interrupted run never looks complete.

Parts: `drawing` draws the shop photos (garment silhouettes and textures), `street` dresses a figure in one
over clutter (with its parse map), `dataset` writes a whole set to disk.

Example:
    >>> from retrieval.synthetic import make_synthetic_dataset
    >>> root = make_synthetic_dataset("/tmp/synthetic-120", n_products=120, seed=0)  # doctest: +SKIP
    >>> sorted(p.name for p in root.iterdir())  # doctest: +SKIP
    ['SYNTHETIC_COMPLETE.json', 'train', 'train_pairs.txt']
"""

from retrieval.synthetic.dataset import (
    SYNTHETIC_FORMAT_VERSION,
    SYNTHETIC_MARKER,
    make_synthetic_dataset,
    make_synthetic_product,
)
from retrieval.synthetic.drawing import GARMENT_KINDS, TEXTURE_KINDS
from retrieval.synthetic.street import (
    LABEL_BACKGROUND,
    LABEL_FACE,
    LABEL_HAIR,
    LABEL_LEFT_ARM,
    LABEL_PANTS,
    LABEL_RIGHT_ARM,
    LABEL_UPPER_CLOTHES,
    LIP_PALETTE,
)

__all__ = [
    "GARMENT_KINDS",
    "LABEL_BACKGROUND",
    "LABEL_FACE",
    "LABEL_HAIR",
    "LABEL_LEFT_ARM",
    "LABEL_PANTS",
    "LABEL_RIGHT_ARM",
    "LABEL_UPPER_CLOTHES",
    "LIP_PALETTE",
    "SYNTHETIC_FORMAT_VERSION",
    "SYNTHETIC_MARKER",
    "TEXTURE_KINDS",
    "make_synthetic_dataset",
    "make_synthetic_product",
]
