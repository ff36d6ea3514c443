"""The proxy plugin contract and the registry every proxy joins.

A proxy maps query images to images, (B, 3, H, W) -> (B, 3, H', W') float in [0, 1], so any proxy
can stand in front of any descriptor. The catalog never goes through a proxy: the proxy's job is to
bring street photos into the catalog's domain.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from retrieval.registry import Registry, module_fingerprint

PROXIES = Registry("proxy")


class Proxy(nn.Module):
    """Base class: subclasses set `default_conf`, `trainable` and implement `forward`."""

    trainable: bool = False
    default_conf: Dict[str, Any] = {}

    def __init__(self, **conf: Any):
        super().__init__()
        unknown = set(conf) - set(self.default_conf)
        if unknown:
            raise ValueError(f"{type(self).__name__} got unknown options {sorted(unknown)}; valid: {sorted(self.default_conf)}")
        self.conf = {**self.default_conf, **conf}
        self.name = getattr(type(self), "registry_name", type(self).__name__)

    def fingerprint(self) -> str:
        """Hash of name, config and weights: part of every feature-cache key downstream."""
        return module_fingerprint(self.name, self.conf, self)


@PROXIES.register("none")
class IdentityProxy(Proxy):
    """No proxy: the raw street photo goes to the descriptor (the paper's plain baselines)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images


def create_proxy(name: str, **conf: Any) -> Proxy:
    return PROXIES.create(name, **conf)


def list_proxies() -> list:
    return PROXIES.names()


def query_embedder(descriptor: "Descriptor", proxy: Optional[Proxy]):
    """(B, 3, H, W) -> (B, D): the proxy (if any) then the descriptor, at the descriptor's input size."""
    if proxy is None or proxy.name == "none":
        return descriptor.embed

    size = descriptor.input_spec.size

    def embed(images: torch.Tensor) -> torch.Tensor:
        generated = proxy(images)
        if generated.shape[-2:] != tuple(size):
            generated = torch.nn.functional.interpolate(generated, size=size, mode="bilinear", align_corners=False)
        return descriptor.embed(generated.clamp(0, 1))

    return embed
