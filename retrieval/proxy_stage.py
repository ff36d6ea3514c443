"""A proxy stage in front of anything that reads images: the one wrapper the engine, the bench and trainers share.

A proxy (`generation.proxies.Proxy`, or any callable (B, 3, H, W) -> (B, 3, h, w) in [0, 1]) may return
another size than the descriptor reads; its output is resized back to the descriptor's input size
(bilinear) and clamped to [0, 1], the same way at query time, in the benchmark and in training. A proxy may
also ask for its photos larger than the descriptor reads them (`proxy_input_size`).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, TypeVar

import torch
import torch.nn.functional as F

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
