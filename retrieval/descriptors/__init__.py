"""Built-in descriptors; importing this module registers them all."""
from retrieval.descriptors.base import (  # noqa: F401
    DESCRIPTORS,
    Descriptor,
    NotFittedError,
    create_descriptor,
    list_descriptors,
)
from retrieval.descriptors import colorhist, gem, rmac  # noqa: F401,E402
from retrieval.descriptors import sift  # noqa: F401
from retrieval.descriptors import delf  # noqa: F401
from retrieval.descriptors import tn  # noqa: F401
from retrieval.descriptors import l2net, lfnet  # noqa: F401
from retrieval.descriptors import surf  # noqa: F401
