"""street2shop: find the exact product a person wears, from a street photo, in a shop's catalog."""

__version__ = "0.1.0"
