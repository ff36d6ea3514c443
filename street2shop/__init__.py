"""street2shop: find the exact product a person wears, from a street photo, in a shop's catalog.

>>> from street2shop import Pipeline                           # doctest: +SKIP
>>> results = Pipeline.load("shop-index").search(["photo.jpg"], k=5)  # doctest: +SKIP
"""

__version__ = "0.1.0"

from street2shop.images import BadImageError  # noqa: E402
from street2shop.pipeline import Pipeline, SearchHit, SearchResult  # noqa: E402

__all__ = ["Pipeline", "SearchHit", "SearchResult", "BadImageError", "__version__"]
