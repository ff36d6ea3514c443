"""A small named registry shared by descriptors, proxies and other plugins.

    DESCRIPTORS = Registry("descriptor")

    @DESCRIPTORS.register("gem")
    class GeM(Descriptor): ...

    DESCRIPTORS.create("gem", p=3.0)   # unknown names raise ValueError listing the valid ones
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, TypeVar

T = TypeVar("T")


class Registry:
    """Maps a plugin name to its factory (usually a class)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(factory: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            setattr(factory, "registry_name", name)
            return factory

        return decorator

    def names(self) -> List[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, **conf: Any) -> Any:
        return self.get(name)(**conf)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


def module_fingerprint(name: str, conf: Dict[str, Any], module) -> str:
    """sha256 (16 hex digits) over a plugin's name, JSON config and every tensor of its state dict.

    Stored in index manifests and feature-cache keys, so that features made by another plugin, another
    config or other weights (a refit codebook, a retrained network) are never mixed up.
    """
    import hashlib
    import json

    digest = hashlib.sha256(name.encode())
    digest.update(json.dumps(conf, sort_keys=True, default=list).encode())
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
