"""The proxy plugin contract and the registry every proxy joins.

A proxy maps query images to images, (B, 3, H, W) -> (B, 3, H', W') float in [0, 1], so any proxy
can stand in front of any descriptor. The catalog never goes through a proxy: the proxy's job is to
bring street photos into the catalog's domain.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from retrieval.proxy_stage import behind_proxy
from retrieval.registry import Registry, module_fingerprint, plugin_conf
from retrieval.training.trainers import add_trainer_modules

if TYPE_CHECKING:  # the annotation only: descriptors need not be imported to build a proxy
    from retrieval.descriptors import Descriptor

PROXIES = Registry("proxy")
Box = Tuple[int, int, int, int]  # (x0, y0, x1, y1), end-exclusive pixels
# Modules whose import registers the built-in proxies (a new proxy file appends its module here).
BUILTIN_PROXY_MODULES = (
    "generation.parsing",
    "generation.paintnet",
    "generation.pix2pix",
    "generation.dtgan",
    "generation.cyclegan",
)


class Proxy(nn.Module):
    """Base class: subclasses set `default_conf`, `trainable` and implement `forward`."""

    trainable: bool = False
    default_conf: Dict[str, Any] = {}

    def __init__(self, **conf: Any):
        super().__init__()
        self.name = getattr(type(self), "registry_name", type(self).__name__)
        self.conf = plugin_conf(self, self.name, conf)

    @property
    def input_scale(self) -> float:
        """How much larger than the descriptor's input the photos are read (`proxy_input_size`); 1 unless the
        proxy's config has an ``input_scale``."""
        return float(self.conf.get("input_scale", 1.0))

    def forward_with_boxes(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[Optional[Box]]]:
        """`forward`'s output and, per image, the (x0, y0, x1, y1) box of the input it was cut from, end-exclusive,
        in the input's pixels; None where the proxy kept (or redrew) the whole image. Proxies that crop
        override this, so that a person sees where the crop was (rank pictures, the web page)."""
        return self(images), [None] * images.shape[0]

    def fingerprint(self) -> str:
        """Hash of name, config and weights: part of every feature-cache key downstream."""
        return module_fingerprint(self.name, self.conf, self)

    def paper_name(self) -> Optional[str]:
        """The proxy of the paper's Table 4 this one is (its numbers go beside ours), or None for a variant."""
        return self.name

    # ---- training (trainable proxies only) ------------------------------------------------
    def train_on(self, dataset, out_dir, **options: Any) -> Path:
        """Train on `dataset`'s training pairs with the trainer registered for this proxy; return final.pt.

        The training itself lives in `generation/training/` (see `retrieval.training.trainers`);
        `street2shop train NAME` calls this with seed, progress, time_budget_s and the options.
        """
        from retrieval.training import train_model  # training stays out of the inference modules until used

        return train_model(self, dataset, out_dir, **options)

    @classmethod
    def conf_for_checkpoint(cls, checkpoint, conf: Dict[str, Any]) -> Dict[str, Any]:
        """The config to build this proxy with before loading `checkpoint` into it: `conf` as given here;
        a proxy whose final.pt records its architecture completes `conf` with it (`GeneratorProxy`)."""
        return dict(conf)

    def load_trained(self, checkpoint) -> "Proxy":
        """Load the weights of a final.pt written by `train_on` (strict: every key must match)."""
        from retrieval.training import load_trained_weights

        load_trained_weights(self, checkpoint, kind="proxy", name=self.name, conf=self.conf)
        return self


@PROXIES.register("none")
class IdentityProxy(Proxy):
    """No proxy: the raw street photo goes to the descriptor (the paper's plain baselines)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images


def _register_builtins() -> None:
    for module in BUILTIN_PROXY_MODULES:
        importlib.import_module(module)


# the proxies' trainers (generation/training/), imported when a trainer is first looked up
add_trainer_modules(
    "generation.training.gan",
    "generation.training.paintnet",
    "generation.training.parsing",
    "generation.training.cyclegan",
)


def create_proxy(name: str, **conf: Any) -> Proxy:
    """Build a registered proxy from a spec: NAME, NAME@final.pt, NAME[k=v;...] or NAME[k=v;...]@final.pt."""
    from retrieval.specs import parse_spec

    _register_builtins()
    spec = parse_spec(name)  # NAME, NAME@ckpt, NAME[k=v], NAME[k=v]@ckpt; keyword options win over bracketed ones
    options = {**spec.options, **conf}
    if spec.checkpoint:
        options = PROXIES.get(spec.name).conf_for_checkpoint(spec.checkpoint, options)
    proxy = PROXIES.create(spec.name, **options)
    if spec.checkpoint:
        proxy.load_trained(spec.checkpoint)
    return proxy


def proxy_training_options(options: Dict[str, Any], model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Training options with a proxy named by a string (``proxy="hp@runs/parser/final.pt"``) built into
    the Proxy object that retrieval-side trainers take (they cannot look proxies up by name: layers).

    A `model` whose branches name proxies of their own (``fused[...;proxies=...]``) also gets them built, as
    ``branch_proxies``: one Proxy or None (the serving proxy) per branch.

    Example:
        >>> proxy_training_options({"epochs": 2, "proxy": "none"})
        {'epochs': 2, 'proxy': 'none'}
        >>> type(proxy_training_options({"proxy": "hp"})["proxy"]).__name__  # doctest: +SKIP
        'HumanParsingProxy'
    """
    options = dict(options)
    proxy = options.get("proxy")
    if isinstance(proxy, str) and proxy != "none":
        options["proxy"] = create_proxy(proxy)
    if getattr(model, "has_branch_proxies", False):
        options["branch_proxies"] = [create_proxy(spec) if spec else None for spec in model.branch_proxies]
    return options


def list_proxies() -> list:
    _register_builtins()
    return PROXIES.names()


def query_embedder(descriptor: "Descriptor", proxy: Optional[Proxy]):
    """(B, 3, H, W) -> (B, D): the proxy (if any) then the descriptor, at the descriptor's input size.

    A fusion whose branches name proxies of their own (``fused[...;proxies=...]``) runs each branch behind its
    proxy (or behind ``proxy`` where it says `same`) and fuses the branch vectors with its weights.
    """
    if not getattr(descriptor, "has_branch_proxies", False):
        return behind_proxy(descriptor.embed, proxy, descriptor.input_spec.size)
    return BranchQueryEmbedder(descriptor, proxy)


class BranchQueryEmbedder:
    """The query side of a fusion with per-branch proxies: each branch behind its own proxy, then fused.

    Each proxy named once is built once (two branches behind ``hp@a.pt`` share it and run it once per batch).
    """

    def __init__(self, fused: "Descriptor", serving_proxy: Optional[Proxy]):
        from retrieval.descriptors.fused import fuse_vectors  # the module only: proxies need no descriptors

        self._fuse = fuse_vectors
        self.fused = fused
        built: Dict[str, Proxy] = {}
        for spec in fused.branch_proxies:
            if spec and spec not in built:
                built[spec] = create_proxy(spec).to(fused.device).eval()
        self.serving_proxy = serving_proxy
        self.proxies: List[Optional[Proxy]] = [built[spec] if spec else serving_proxy for spec in fused.branch_proxies]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, serving_output: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) fused vectors; ``serving_output``: the serving proxy's output on ``images`` at
        the fusion's input size when the caller already has it (the pipeline shows it), so it is not run again."""
        known = None if serving_output is None else {id(self.serving_proxy): serving_output}
        vectors = self.fused.branch_vectors_behind(images, self.proxies, known=known)
        return self._fuse(vectors, self.fused.fusion_weights)
