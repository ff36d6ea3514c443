"""Errors raised by the index package; both are ValueErrors so callers validating input catch them."""


class IndexMismatchError(ValueError):
    """The index was built for other vectors than the ones offered (descriptor, fingerprint or dim)."""


class IndexCorruptError(ValueError):
    """A saved index fails its integrity checks (checksum, manifest fields, id count)."""
