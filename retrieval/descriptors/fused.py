"""Score-level fusion of several descriptors as one descriptor: ``fused[branches=tn@a.pt|tn@b.pt]``.

The fused score of a query q and a product g is a weighted sum of the branches' cosine similarities,

    s(q, g) = sum_i w_i <q_i, g_i>,    w_i >= 0, sum_i w_i = 1,

and it is the inner product of one vector: each branch's L2-normalised vector scaled by sqrt(w_i), the scaled
vectors concatenated (unit norm again, since the weights sum to 1). So a FAISS index of fused vectors ranks by
the fused score exactly, and the pipeline, the bench, the service and the re-ranker need nothing new; a saved
index holds every branch's weights in its descriptor state.

The weights are fitted on training pairs by `street2shop train descriptor fused` (`retrieval.training.fused`:
a grid over the simplex, maximising mAP@20 on a held-out share of the training pairs, never on evaluated
queries); untrained, they are equal (or `weights=` as given). Each branch gets the photo at its own input size.

A branch reads the query behind the pipeline's proxy unless `proxies=` names its own, one proxy spec per branch
('|'-separated, `same` or empty for the pipeline's): ``fused[branches=tn@a|tn@b;proxies=same|none]`` puts the
second branch on the raw photo. Proxies live in a higher layer, so this module only records the specs; the layers
that can build proxies (`generation.proxies.query_embedder`, the bench) run them. Catalog images never go through
a proxy, so the gallery side is the same either way.

Example:
    >>> fused = create_descriptor("fused[branches=colorhist|colorhist[bins=(8, 2, 2)]]")
    >>> fused.dim, fused.embed(torch.rand(2, 3, 64, 48)).norm(dim=1).round(decimals=4).tolist()
    (288, [1.0, 1.0])
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.descriptors.base import DESCRIPTORS, Descriptor, check_images, create_descriptor
from retrieval.proxy_stage import proxy_input_size, to_descriptor_input
from retrieval.types import GlobalFeatures

BRANCH_SEPARATOR = "|"


def branch_specs(text: str) -> List[str]:
    """'tn@a.pt|gem' -> ['tn@a.pt', 'gem'] (a spec's own options use ';' and ',', so branches use '|').

    Example:
        >>> branch_specs("tn@runs/a/final.pt | gem[p=3.0]")
        ['tn@runs/a/final.pt', 'gem[p=3.0]']
    """
    specs = [spec.strip() for spec in str(text).split(BRANCH_SEPARATOR) if spec.strip()]
    if len(specs) < 2:
        raise ValueError(f"fused needs at least 2 branches separated by '{BRANCH_SEPARATOR}', got {text!r}")
    return specs


def branch_proxy_specs(text: Any, n_branches: int) -> List[Optional[str]]:
    """The `proxies` option -> one proxy spec per branch, None for the pipeline's own ('same' or empty).

    Example:
        >>> branch_proxy_specs("same|none", 2), branch_proxy_specs("", 3)
        ([None, 'none'], [None, None, None])
    """
    if not text:
        return [None] * n_branches
    specs = [spec.strip() for spec in str(text).split(BRANCH_SEPARATOR)]
    if len(specs) != n_branches:
        raise ValueError(
            f"proxies names {len(specs)} proxies for {n_branches} branches: give one per branch, "
            f"'{BRANCH_SEPARATOR}'-separated ('same' for the pipeline's own), got {text!r}"
        )
    return [None if spec in ("", "same") else spec for spec in specs]


def fuse_vectors(vectors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Branch vectors (each (B, D_i), L2-normalised) -> (B, sum D_i): each scaled by sqrt(w_i), concatenated.

    Example:
        >>> a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> fused = fuse_vectors([a, b], torch.tensor([0.75, 0.25]))
        >>> float(fused @ fuse_vectors([a, a.flip(1)], torch.tensor([0.75, 0.25])).T)  # 0.75*1 + 0.25*1
        1.0
    """
    return torch.cat([v * weights[i].clamp_min(0).sqrt() for i, v in enumerate(vectors)], dim=1)


def normalised_weights(weights: Any, n_branches: int) -> torch.Tensor:
    """None (equal) or n non-negative numbers -> (n,) float32 summing to 1."""
    if weights is None:
        return torch.full((n_branches,), 1.0 / n_branches)
    values = torch.as_tensor([float(w) for w in weights], dtype=torch.float32)
    if values.numel() != n_branches or (values < 0).any() or float(values.sum()) <= 0:
        raise ValueError(f"weights must be {n_branches} non-negative numbers, not all 0, got {weights!r}")
    return values / values.sum()


def _architecture(branch: Descriptor) -> str:
    """A branch as a spec without weights: its name and the options that differ from its defaults."""
    changed = {k: v for k, v in branch.conf.items() if branch.default_conf.get(k) != v}
    options = ";".join(f"{key}={value!r}" for key, value in changed.items())
    return f"{branch.name}[{options}]" if options else branch.name


@DESCRIPTORS.register("fused")
class FusedDescriptor(Descriptor):
    """Score-level fusion of descriptors (`branches`, '|'-separated specs) with weights fitted on training pairs.

    Config:
        branches: the branch descriptors' specs, e.g. "tn@runs/tn-studio/final.pt|tn@runs/tn-street/final.pt".
            Checkpoint paths load the branches' weights when the fusion is built; the recorded config keeps
            only their architectures, and their weights travel in the fused state (checkpoints, indexes).
        weights: the branches' weights (normalised to sum 1); None: equal, until trained.
        proxies: one proxy spec per branch ('|'-separated; `same` or empty: the pipeline's proxy), or empty for
            every branch behind the pipeline's proxy (`branch_proxy_specs`).
    """

    kind = "global"
    trainable = True
    # training only chooses the weights: a spec that gives them names a finished fusion (the bench runs it as is)
    options_a_training_sets = ("weights",)
    default_conf: Dict[str, Any] = {"branches": "", "weights": None, "proxies": ""}

    def __init__(self, **conf: Any):
        super().__init__(**conf)
        self.branches = nn.ModuleList()
        self.branch_proxies: List[Optional[str]] = []
        self.register_buffer("fusion_weights", torch.zeros(0))
        if self.conf["branches"]:  # else `load_trained` builds them from the checkpoint's record
            self._build(self.conf["branches"])

    def _build(self, branches: str) -> None:
        specs = branch_specs(branches)
        self.branches = nn.ModuleList([create_descriptor(spec) for spec in specs])
        self.fusion_weights = normalised_weights(self.conf["weights"], len(specs))
        self.branch_proxies = branch_proxy_specs(self.conf["proxies"], len(specs))
        self.needs_fit = any(branch.needs_fit for branch in self.branches)
        self._fitted.fill_(not self.needs_fit)
        # What a wheel ships stays out of checkpoints and indexes, branch by branch.
        self.shipped_state_prefixes = tuple(
            f"branches.{i}.{prefix}"
            for i, branch in enumerate(self.branches)
            for prefix in branch.shipped_state_prefixes
        )

    def load_trained(self, checkpoint) -> "FusedDescriptor":
        """`fused@final.pt` alone: the branches' architectures come from the checkpoint's record, their weights
        and the fusion's from its state."""
        if not len(self.branches):
            from retrieval.training import load_checkpoint

            recorded = load_checkpoint(checkpoint, map_location="cpu").get("descriptor_conf") or {}
            if not recorded.get("branches"):
                raise ValueError(f"{checkpoint} records no fused branches: was it written by `train descriptor fused`?")
            self.conf["proxies"] = recorded.get("proxies", "")
            self._build(recorded["branches"])
        return super().load_trained(checkpoint)

    def _branches(self) -> nn.ModuleList:
        if not len(self.branches):
            raise ValueError("fused needs its branches: fused[branches=SPEC|SPEC...] or fused@final.pt of a training")
        return self.branches

    @property
    def dim(self) -> int:
        return sum(branch.dim for branch in self._branches())

    def config(self) -> Dict[str, Any]:
        """The branches' architectures (specs without checkpoint paths) and the weights: with the state dict,
        enough to rebuild the fusion anywhere, and the same whether it was built from checkpoints or an index."""
        architectures = [_architecture(branch) for branch in self._branches()]
        config = {
            "branches": BRANCH_SEPARATOR.join(architectures),
            "weights": [round(float(w), 6) for w in self.fusion_weights],
        }
        if any(self.branch_proxies):  # recorded only when used: older fusions keep their fingerprints
            config["proxies"] = BRANCH_SEPARATOR.join(spec or "same" for spec in self.branch_proxies)
        return config

    @property
    def has_branch_proxies(self) -> bool:
        """Whether some branch reads the query behind a proxy of its own (see the module docstring)."""
        return any(self.branch_proxies)

    def branch_vectors(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Each branch's L2-normalised (B, D_i) vectors, each branch reading the images at its own input size."""
        return [self.branch_vector(branch, images) for branch in self._branches()]

    def branch_vectors_behind(
        self,
        images: torch.Tensor,
        proxies: Sequence[Any],
        catalog: bool = False,
        known: Optional[Dict[int, torch.Tensor]] = None,
    ) -> List[torch.Tensor]:
        """Each branch's (B, D_i) vectors, branch i reading ``images`` behind ``proxies[i]``.

        A proxy is any (B, 3, H, W) -> (B, 3, h, w) callable, read at its `proxy_input_size`; None or one named
        "none" leaves the images as they are. Each distinct proxy runs once; ``known`` holds outputs already
        computed, by ``id(proxy)`` (a pipeline's serving proxy), at the fusion's input size. ``catalog``: catalog
        photos, through each branch's `embed_catalog`.
        """
        size = tuple(self.input_spec.size)
        outputs = dict(known or {})
        vectors = []
        for branch, proxy in zip(self._branches(), proxies):
            if id(proxy) not in outputs:
                seen = images
                if proxy is not None and getattr(proxy, "name", None) != "none":
                    seen = proxy(to_descriptor_input(images, proxy_input_size(proxy, size)))
                outputs[id(proxy)] = to_descriptor_input(seen, size)
            vectors.append(self.branch_vector(branch, outputs[id(proxy)], catalog=catalog))
        return vectors

    @staticmethod
    def branch_vector(branch: Descriptor, images: torch.Tensor, catalog: bool = False) -> torch.Tensor:
        """One branch's (B, D_i) vectors of (B, 3, H, W) images, resized to the branch's input size first
        (``catalog``: catalog photos, through the branch's `embed_catalog`)."""
        size = tuple(branch.input_spec.size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        return branch.embed_catalog(images) if catalog else branch.embed(images)

    @torch.no_grad()
    def embed_catalog(self, images: torch.Tensor) -> torch.Tensor:
        """Catalog photos -> fused vectors, each branch through its own `embed_catalog` (its `catalog_blur`)."""
        check_images(images)
        vectors = [self.branch_vector(branch, images, catalog=True) for branch in self._branches()]
        return fuse_vectors(vectors, self.fusion_weights)

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> GlobalFeatures:
        return GlobalFeatures(fuse_vectors(self.branch_vectors(images), self.fusion_weights))

    def fit(self, batches) -> "FusedDescriptor":
        """Fit the branches that need it (codebooks, whitening) on the same training images."""
        needing = [branch for branch in self.branches if branch.needs_fit]
        if len(needing) > 1:
            batches = list(batches)  # each branch reads them once: a one-shot generator is kept for all
        for branch in needing:
            branch.fit(iter(batches))
        self._fitted.fill_(True)
        return self
