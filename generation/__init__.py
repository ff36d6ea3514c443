"""Proxy stages that turn a street photo into a product-like image before the descriptor."""
