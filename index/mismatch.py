"""Whether an index fits the vectors a query brings (descriptor, fingerprint, dim): the check behind
:class:`index.IndexMismatchError`, with a message that names both sides and the fix."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .errors import IndexMismatchError

DEFAULT_COMPAT_KEYS = ("descriptor", "fingerprint", "dim")
"""The metadata keys :meth:`index.ProductIndex.check_compatible` compares unless told others."""


def check_index_matches(
    metadata: Mapping[str, Any], dim: int, expected: Mapping[str, Any], keys: Sequence[str], where: str
) -> None:
    """Raise if an index of ``metadata`` and real dim ``dim`` was built for other vectors than ``expected``
    describes (see :meth:`index.ProductIndex.check_compatible`); ``where`` is ``" at <dir>"`` or ``""``."""
    built = dict(metadata)
    built.setdefault("dim", dim)
    compared = [key for key in keys if key in expected]
    differing = [key for key in compared if built.get(key) != expected[key]]
    if "dim" in expected and expected["dim"] != dim and "dim" not in differing:
        differing.append("dim")
    if not differing:
        return
    ours = describe_side(built, compared)
    theirs = describe_side(expected, compared)
    wanted, have = expected.get("descriptor"), built.get("descriptor")
    if wanted is None:
        fix = "rebuild the index with `street2shop index` from the vectors you query with"
    elif wanted == have:
        fix = (
            f"descriptor {wanted!r} changed since the index was built (differs in "
            f"{', '.join(differing)}): rebuild the index with `street2shop index --descriptor {wanted}`"
        )
    else:
        fix = f"rebuild the index with `street2shop index --descriptor {wanted}`"
        if have is not None:
            fix += f" or query with --descriptor {have}"
    raise IndexMismatchError(f"index{where} was built with {ours} but the query uses {theirs}: {fix}")


def describe_side(values: Mapping[str, Any], keys: Sequence[str]) -> str:
    """'descriptor 'gem' (fingerprint abc, dim 1280)' from the compared keys."""
    if "descriptor" in keys:
        head = f"descriptor {values.get('descriptor')!r}"
        rest = [key for key in keys if key != "descriptor"]
    else:
        head, rest = "vectors", list(keys)
    details = ", ".join(f"{key} {values.get(key, 'unknown')}" for key in rest)
    return f"{head} ({details})" if details else head
