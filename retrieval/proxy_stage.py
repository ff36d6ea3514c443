"""A proxy stage in front of anything that reads images: the one wrapper the engine, the bench and trainers share.

A proxy (`generation.proxies.Proxy`, or any callable (B, 3, H, W) -> (B, 3, h, w) in [0, 1]) may return
another size than the descriptor reads; its output is resized back to the descriptor's input size
(bilinear) and clamped to [0, 1], the same way at query time, in the benchmark and in training. A proxy may
also ask for its photos larger than the descriptor reads them (`proxy_input_size`). A trainer that reads its
street photos behind a proxy takes it as a built object (`training_proxy`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import nn

Output = TypeVar("Output")


def to_descriptor_input(generated: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A proxy's output at the descriptor's input size, clamped to [0, 1].

    Shape:
        - generated: (B, 3, h, w)
        - output: (B, 3, H, W) with (H, W) = size

    Example:
        >>> out = to_descriptor_input(torch.full((1, 3, 4, 4), 2.0), (2, 2))
        >>> tuple(out.shape), float(out.max())
        ((1, 3, 2, 2), 1.0)
    """
    if tuple(generated.shape[-2:]) != tuple(size):
        generated = F.interpolate(generated, size=tuple(size), mode="bilinear", align_corners=False)
    return generated.clamp(0, 1)


def proxy_input_size(proxy: Optional[object], size: Sequence[int]) -> Tuple[int, int]:
    """(H, W) photos are read at for ``proxy``: its ``input_scale`` (default 1) times the descriptor's ``size``.

    A proxy that crops (hp cuts the garment's box out) keeps more of a small person's garment when it reads
    the photo larger than the descriptor does; its output is resized to ``size`` afterwards either way.

    Example:
        >>> class Cropper:
        ...     input_scale = 3.0
        >>> proxy_input_size(Cropper(), (256, 192)), proxy_input_size(None, (256, 192))
        ((768, 576), (256, 192))
    """
    scale = float(getattr(proxy, "input_scale", 1.0) or 1.0)
    return (max(1, round(int(size[0]) * scale)), max(1, round(int(size[1]) * scale)))


def box_in_photo(
    box: Optional[Tuple[int, int, int, int]], read: Sequence[int], photo: Sequence[int]
) -> Optional[Tuple[int, int, int, int]]:
    """A proxy's crop box (x0, y0, x1, y1) in the pixels of the (H, W) it read, scaled to the photo's (H, W).

    Example:
        >>> box_in_photo((10, 20, 30, 40), (256, 192), (512, 384)), box_in_photo(None, (8, 8), (8, 8))
        ((20, 40, 60, 80), None)
    """
    if box is None:
        return None
    sy, sx = photo[0] / read[0], photo[1] / read[1]
    x0, y0, x1, y1 = box
    return (int(round(x0 * sx)), int(round(y0 * sy)), int(round(x1 * sx)), int(round(y1 * sy)))


def behind_proxy(
    read: Callable[[torch.Tensor], Output],
    proxy: Optional[Callable[[torch.Tensor], torch.Tensor]],
    size: Sequence[int],
) -> Callable[[torch.Tensor], Output]:
    """``read`` (a descriptor's `embed` or `extract`) after an optional proxy stage at input ``size``.

    ``proxy`` None, or a proxy named "none", means no stage: ``read`` itself is returned.
    """
    if proxy is None or getattr(proxy, "name", None) == "none":
        return read

    def proxied(images: torch.Tensor) -> Output:
        return read(to_descriptor_input(proxy(images), size))

    return proxied


def training_proxy(
    proxy: Any, trainer: str, device: Optional[Union[str, torch.device]] = None
) -> Tuple[Optional[Callable[[torch.Tensor], torch.Tensor]], Dict[str, str]]:
    """A trainer's ``proxy`` option -> (the proxy, or None; ``{"name", "fingerprint"}`` for its run config).

    Proxies live in generation/, a layer above retrieval/ (DESIGN.md layers): a trainer takes a built Proxy
    object (or any callable (B, 3, H, W) -> (B, 3, h, w) in [0, 1]), never a name; its callers build it with
    `generation.proxies.proxy_training_options` (the CLI, `bench --train` and `street2shop build` do). A
    network is put in eval mode, and on ``device`` when one is given.

    Raises:
        ValueError: a proxy name (naming ``trainer`` and who builds it), or something not callable.

    Example:
        >>> training_proxy("none", "tn")
        (None, {'name': 'none', 'fingerprint': ''})
    """
    if proxy is None or proxy == "none":
        return None, {"name": "none", "fingerprint": ""}
    if isinstance(proxy, str):
        raise ValueError(
            f"{trainer}.train_on takes proxy= as a Proxy object, not the name {proxy!r}: build it with "
            "generation.proxies.create_proxy (the CLI and `bench --train` do)"
        )
    if not callable(proxy):
        raise ValueError(f"proxy must be None, 'none' or a callable Proxy, got {type(proxy).__name__}")
    if isinstance(proxy, nn.Module):
        proxy.eval()
        if device is not None:
            proxy.to(device)
    name = getattr(proxy, "name", type(proxy).__name__)
    fingerprint = proxy.fingerprint() if hasattr(proxy, "fingerprint") else ""
    return proxy, {"name": str(name), "fingerprint": str(fingerprint)}
