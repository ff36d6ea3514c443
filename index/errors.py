"""Errors raised by the index package. The first two are ValueErrors so callers validating input catch them."""


class IndexMismatchError(ValueError):
    """The index was built for other vectors than the ones offered (descriptor, fingerprint or dim)."""


class IndexCorruptError(ValueError):
    """A saved index fails its integrity checks (a checksum, manifest fields, id count, attachment names)."""


class IndexLockedError(TimeoutError):
    """Another process kept saving the same index directory for longer than the save was willing to wait."""
