"""Descriptors, backbones, datasets and robust image I/O of street2shop.

Importing this package registers every built-in descriptor (see `retrieval.descriptors`).
"""

PACKAGE_ID = "street2shop.retrieval"
