"""Training of DELF's attention (`retrieval.descriptors.delf`) on the training pairs' product ids.

Both photos of a pair carry the label of its product, so the attention learns which locations
identify a garment *across* the two domains. With only two photos per label, the paper's free
linear classifier memorises the labels and stops teaching the attention; by default its weights are
therefore the batch's product photos pooled by the same attention (`paired_attention_loss`; the
paper's loss stays available, see `train_delf`). The backbone stays frozen: training runs on block
features cached once per run (`retrieval.training.map_cache`), which makes it a few minutes on a CPU.

For street queries, like tn (`retrieval.training.tn`): ``street_copies`` adds street-condition versions of
every pair (`retrieval.datasets.viton_street.street_training_pairs`), and ``proxy`` (a built Proxy object,
e.g. the street parser) reads the person photos behind the proxy the descriptor will serve behind; product
photos never go through it.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.batching import iter_batches
from retrieval.datasets.viton_street import street_training_pairs
from retrieval.descriptors.delf import DELF, TRAINED_PREFIXES
from retrieval.files import read_checked_bytes, write_checked_bytes
from retrieval.proxy_stage import behind_proxy, proxy_input_size, training_proxy
from retrieval.training.map_cache import cache_chunks, float16_maps
from retrieval.training.run import TrainingRun
from retrieval.training.trainers import TrainingJob, register_trainer

log = logging.getLogger("street2shop.retrieval")

# Inverse temperature of the paired loss's cosine logits.
PAIRED_LOGIT_SCALE = 16.0
TRAINING_LOSSES = ("paired", "classifier")
CACHE_PAIRS_PER_CHUNK = 64
# With a time budget, caching stops after this share of it so that training gets the rest.
CACHE_BUDGET_SHARE = 0.5


@dataclass(frozen=True)
class DELFTrainConfig:
    """The training options of `delf` (`street2shop train descriptor delf --set KEY=VALUE`).

    A run over the VITON training split (~3,600 pairs, ~7,300 images) is mostly the one-off caching
    of the frozen block features (~5-10 minutes on 2 CPU cores); an epoch over the cached features
    then takes seconds. On a VITON validation subset the paired loss reached its retrieval quality
    within 1-3 epochs and stayed there (10 epochs: same within noise); 5 is a margin, not a tuned optimum.

    street_copies: street-condition versions of every training pair added to the pairs
    (`retrieval.datasets.viton_street.street_training_pairs`; needs a VITON-layout set); proxy: "none" or a
    built Proxy object the person photos are read behind before caching (`--set proxy=hp@RUN/final.pt`: the
    CLI builds it; product photos never go through it).
    """

    epochs: int = 5
    batch_size: int = 32  # pairs, i.e. 64 images
    lr: float = 1e-3
    loss: str = "paired"  # one of TRAINING_LOSSES
    weight_decay: float = 1e-4
    cache_batch_size: int = 32  # images per backbone batch while caching
    street_copies: int = 0
    proxy: Any = "none"


def attention_pool(features: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """DELF's training pooling: mean over locations of attention times the L2-normalised feature.

    Shape:
        - features: (B, C, h, w)
        - attention: (B, 1, h, w), non-negative
        - output: (B, C)

    Example:
        >>> features = torch.tensor([[[[3.0, 1.0]], [[4.0, 0.0]]]])  # two locations, C = 2
        >>> attention_pool(features, torch.tensor([[[[1.0, 2.0]]]]))
        tensor([[1.3000, 0.4000]])
    """
    return (F.normalize(features, dim=1) * attention).mean(dim=(2, 3))


def paired_attention_loss(
    attention: nn.Module,
    product_features: torch.Tensor,
    person_features: torch.Tensor,
    scale: float = PAIRED_LOGIT_SCALE,
    labels: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DELF's image-level loss with the classifier's weights tied to the batch's product photos.

    Each person photo is classified over the B product ids of the batch, the weight vector of
    product j being the attention-pooled feature of its own photo (and symmetrically each product
    photo over the B persons); logits are scaled cosines, the loss the mean cross-entropy of both
    directions. It is `attention_classification_loss` with a classifier that cannot memorise: with
    two images per product id, a free linear classifier learns each id from those two images alone
    and then no longer needs the attention to find the garment (see `train_delf`).

    ``labels`` (the pairs' product ids) matter when a batch holds two pairs of one product (street
    copies): the other pair's photo is then no negative, and its logit is left out (-inf) in both
    directions, the pair's own kept. Without labels, or with distinct ones, nothing is left out.

    Shape:
        - product_features, person_features: (B, C, h, w), row i of both = pair i
        - labels: (B,) or None
        - output: (scalar loss, scalar accuracy of the person -> product direction)
    """
    products = F.normalize(attention_pool(product_features, attention(product_features)), dim=1)
    persons = F.normalize(attention_pool(person_features, attention(person_features)), dim=1)
    logits = scale * persons @ products.T  # (B persons, B products)
    if labels is not None:
        labels = labels.to(logits.device)
        same_product = labels[:, None] == labels[None, :]  # symmetric, so it serves logits.T as well
        same_product.fill_diagonal_(False)
        if same_product.any():
            logits = logits.masked_fill(same_product, float("-inf"))
    targets = torch.arange(len(logits), device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
    accuracy = (logits.argmax(dim=1) == targets).float().mean()
    return loss, accuracy


def attention_classification_loss(
    attention: nn.Module, classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the classifier on attention-pooled features; also the batch accuracy.

    Shape:
        - features: (B, C, h, w) frozen block features
        - labels: (B,) class indices
        - output: (scalar loss, scalar accuracy)
    """
    logits = classifier(attention_pool(features, attention(features)))
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return loss, accuracy


@register_trainer("delf", config=DELFTrainConfig)
def train_delf(delf: DELF, job: TrainingJob, config: DELFTrainConfig) -> Path:
    """Train the attention on the training pairs' product ids (``job.dataset.train``); return final.pt.

    Both photos of a pair share the label of its product. Two image-level losses, both
    attention-pooled features -> classifier over product ids -> cross-entropy:

    - "paired" (default, `paired_attention_loss`): the classifier's weights are the batch's
      product photos, pooled by the same attention.
    - "classifier" (the paper's, `attention_classification_loss`): a free linear classifier
      over all training product ids (street copies of a pair share its id). Measured on the first
      300 products of the VITON validation split (VLAD, mAP@20): it peaked after 1-2 epochs
      (0.58-0.60) and then fell to 0.27-0.35 as the classifier memorised the two images of each id
      (loss 8.2 -> 0.5 at lr 1e-2), and wandered between 0.46 and 0.62 at lr 1e-3; "paired" stayed
      at 0.64-0.69 over 1-10 epochs. Untrained: 0.16.

    ``batch_size`` counts pairs (both photos of each go into the batch). The frozen block features of every
    training image (at scale 1) are cached once under ``job.out_dir/block-features/`` (float16,
    about 43 KB per 256x192 image), in chunks of pairs in a seeded order, so an interrupted run
    resumes its caching as well as its training. With a time budget, caching stops after
    half of it and training uses the pairs cached so far (a warning says how many).

    ``street_copies`` > 0 trains on the studio pairs followed by that many street-condition versions of
    each (`street_training_pairs`, copy c seeded with ``STREET_TRAINING_SEED + seed + c`` like tn's), so a
    product has several pairs and "paired" leaves a batch's other pairs of the row's product out of its
    negatives (``labels`` of `paired_attention_loss`). ``proxy`` (a built Proxy object, see
    `retrieval.proxy_stage.training_proxy`) reads the person photos, at its `proxy_input_size`, before
    their block features are cached; product photos never go through it. Both are recorded in the run
    config only when used, so a run without them resumes as before.

    final.pt holds the attention only: use it as ``delf@OUT/final.pt``, which is then fitted
    (PCA, codebook) like the untrained one.
    """
    dataset, out_dir, seed = job.dataset, job.out_dir, job.seed
    if dataset.train is None or dataset.train.empty:
        raise ValueError(f"{dataset.name} has no training pairs to train {delf.name} on")
    pairs = dataset.train.sort_values("pair_id").reset_index(drop=True)
    street_copies = int(config.street_copies)
    if street_copies < 0:
        raise ValueError(f"street_copies must be >= 0, got {street_copies}")
    if street_copies:  # the studio pairs in the order above, then each copy of them in the same order
        pairs = street_training_pairs(dataclasses.replace(dataset, train=pairs), street_copies, seed=seed)
    proxy, proxy_label = training_proxy(config.proxy, delf.name, delf.device)
    products = sorted(pairs["product_id"].astype(str).unique())
    labels = pairs["product_id"].astype(str).map({p: i for i, p in enumerate(products)}).to_numpy()
    loss = config.loss
    if loss not in TRAINING_LOSSES:
        raise ValueError(f"unknown DELF training loss {loss!r}; valid: {', '.join(TRAINING_LOSSES)}")
    epochs, batch_size, lr = int(config.epochs), int(config.batch_size), float(config.lr)
    weight_decay = config.weight_decay
    modules: Dict[str, nn.Module] = {"attention": delf.attention}
    if loss == "classifier":
        modules["classifier"] = nn.Linear(delf.channels, len(products)).to(delf.device)
    parameters = [p for module in modules.values() for p in module.parameters()]
    optimiser = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    run_config = {
        "descriptor": delf.name,
        "descriptor_config": delf.config(),
        "dataset": dataset.name,
        "pairs": len(pairs),
        "products": len(products),
        "loss": loss,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": seed,
    }
    # only when used, so that the configs of runs from before these options still match on resume
    if street_copies:
        run_config["street_copies"] = street_copies
    if proxy is not None:
        run_config["proxy"] = proxy_label
    run = TrainingRun(
        out_dir,
        modules,
        {"adam": optimiser},
        run_config,
        **job.run_options(f"train {delf.name}"),
    )
    delf.backbone.eval()
    product_maps, person_maps, targets = _cached_training_features(
        delf, pairs, labels, proxy, out_dir / "block-features", run, seed, int(config.cache_batch_size), job.progress
    )
    n_pairs = len(targets)
    for epoch in run.epochs(epochs):
        order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for batch in run.skip_done(order[i : i + batch_size] for i in range(0, n_pairs, batch_size)):
            products_batch = product_maps[batch].to(delf.device, torch.float32)
            persons_batch = person_maps[batch].to(delf.device, torch.float32)
            if loss == "paired":
                value, accuracy = paired_attention_loss(
                    delf.attention, products_batch, persons_batch, labels=targets[batch]
                )
            else:
                value, accuracy = attention_classification_loss(
                    delf.attention,
                    modules["classifier"],
                    torch.cat([products_batch, persons_batch]),
                    targets[batch].repeat(2).to(delf.device),
                )
            optimiser.zero_grad(set_to_none=True)
            value.backward()
            optimiser.step()
            run.log({"loss": value.item(), "accuracy": accuracy.item()})
            if run.out_of_time:
                break
    weights = {k: v.detach().cpu() for k, v in delf.state_dict().items() if k.startswith(TRAINED_PREFIXES)}
    extra = {"descriptor": delf.name, **({"proxy": proxy_label} if proxy is not None else {})}
    return run.finish(weights=weights, extra=extra)


def _cached_training_features(
    delf: DELF,
    pairs,
    labels: np.ndarray,
    proxy: Optional[Callable[[torch.Tensor], torch.Tensor]],
    cache_dir: Path,
    run,
    seed: int,
    batch_size: int,
    progress: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block features (float16) of the training pairs' two photos, cached in chunks of pairs (`cache_chunks`).

    A chunk file `chunk-NNNNN.npz` (sealed by `write_checked_bytes`) holds "features": the product
    photos of its pairs, then their person photos (behind `proxy` when one is given), in the same
    order, and "labels" likewise (twice).

    Returns:
        (product maps (P, C, h, w), person maps (P, C, h, w), labels (P,) int64) for the P
        pairs cached so far; row i of all three is pair i.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(pairs))
    chunks = [order[i : i + CACHE_PAIRS_PER_CHUNK] for i in range(0, len(order), CACHE_PAIRS_PER_CHUNK)]
    size = tuple(delf.conf["image_size"])

    def compute(number: int, inputs: None) -> Tuple[np.ndarray, np.ndarray]:
        """Block maps (2n, C, h, w) float16 of the chunk's products then persons, and their labels."""
        chunk = chunks[number]
        products, persons = list(pairs["product_image"].iloc[chunk]), list(pairs["person_image"].iloc[chunk])
        if proxy is None:  # one stream of batches, as before the proxy option: the cached maps stay the same
            maps = float16_maps(delf.block_features, iter_batches(products + persons, size, batch_size), delf.device)
        else:
            read = proxy_input_size(proxy, size)
            person_features = behind_proxy(delf.block_features, proxy, size)
            maps = torch.cat(
                [
                    float16_maps(delf.block_features, iter_batches(products, size, batch_size), delf.device),
                    float16_maps(person_features, iter_batches(persons, read, batch_size), delf.device),
                ]
            )
        return maps.numpy(), np.concatenate([labels[chunk], labels[chunk]])

    cached = cache_chunks(
        len(chunks),
        lambda number: cache_dir / f"chunk-{number:05d}.npz",
        compute,
        save=_save_chunk,
        load=_load_chunk,
        run=run,
        budget_share=CACHE_BUDGET_SHARE,
        label=f"cache {delf.conf['endpoint']} features",
        progress=progress,
    )
    halves = [len(chunk_labels) // 2 for _, chunk_labels in cached]
    if len(cached) < len(chunks):
        log.warning("time budget: training %s on the %d of %d pairs cached so far", delf.name, sum(halves), len(pairs))
    return (
        torch.from_numpy(np.concatenate([maps[:n] for (maps, _), n in zip(cached, halves)])),
        torch.from_numpy(np.concatenate([maps[n:] for (maps, _), n in zip(cached, halves)])),
        torch.from_numpy(np.concatenate([chunk_labels[:n] for (_, chunk_labels), n in zip(cached, halves)])).long(),
    )


def _save_chunk(chunk: Tuple[np.ndarray, np.ndarray], path: Path) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, features=chunk[0], labels=chunk[1])
    write_checked_bytes(path, buffer.getvalue())


def _load_chunk(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """A chunk of `_save_chunk`; ValueError or OSError when damaged or written before checksums."""
    with np.load(io.BytesIO(read_checked_bytes(path))) as stored:
        return stored["features"], stored["labels"]
