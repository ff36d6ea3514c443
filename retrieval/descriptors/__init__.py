"""Built-in descriptors; importing this module registers them all."""

from retrieval.descriptors import (  # noqa: F401,E402  # noqa: F401
    colorhist,
    delf,  # noqa: F401
    fused,
    gem,
    l2net,
    lfnet,
    rmac,
    sift,  # noqa: F401
    surf,  # noqa: F401
    tn,  # noqa: F401
)
from retrieval.descriptors.base import (  # noqa: F401
    DESCRIPTORS,
    Descriptor,
    NotFittedError,
    create_descriptor,
    list_descriptors,
)
