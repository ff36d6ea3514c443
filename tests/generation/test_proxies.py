"""One contract test over the whole proxy registry, and the registry's own behaviour.

Every registered proxy is checked untrained, and trainable proxies listed in TINY_TRAINING also with a
tiny checkpoint trained on the synthetic set (create_proxy("NAME@final.pt")). A proxy whose untrained
form is refused by design goes in NEEDS_CHECKPOINT (it must then have a TINY_TRAINING entry).
"""

import pytest
import torch

from generation.proxies import PROXIES, Proxy, create_proxy, list_proxies, query_embedder
from retrieval.datasets import load_viton

# Small settings so the contract test runs in seconds; each stays a valid configuration.
TINY = {
    "hp": {"grabcut_iterations": 2},
    "pix2pix": {"width": 8},
    "dtgan": {"stem_width": 4},
    "paintnet": {"width": 0.125, "sp_image_size": (64, 48), "sp_hidden": 16, "sp_dim": 16, "sp_k": 3},
    "paintnet-wo-sp": {"width": 0.125},
    **{name: {"image_size": 32, "width": 4, "n_blocks": 1} for name in ("cyclegan", "cyclegan-long", "cyclegan-nest")},
}
# train_on options for a tiny checkpoint (seed, progress and out_dir are added by the test).
TINY_TRAINING = {
    "hp": {"epochs": 1, "batch_size": 16, "image_size": (32, 32), "val_images": 0},
    "pix2pix": {"epochs": 1, "batch_size": 4, "max_pairs": 8, "d_width": 8, "sample_every": 0},
    "dtgan": {"epochs": 1, "batch_size": 4, "max_pairs": 8, "d_width": 8, "sample_every": 0},
    "paintnet": {"epochs": 1, "batch_size": 4, "max_pairs": 8, "sp_epochs": 1, "sample_every": 0},
    "paintnet-wo-sp": {"epochs": 1, "batch_size": 4, "max_pairs": 8, "sample_every": 0},
    **{
        name: {"epochs": 1, "batch_size": 4, "max_pairs": 8, "d_width": 4, "pool_size": 2, "sample_every": 0}
        for name in ("cyclegan", "cyclegan-long", "cyclegan-nest")
    },
}
NEEDS_CHECKPOINT = set()

CASES = [(name, False) for name in list_proxies() if name not in NEEDS_CHECKPOINT] + [
    (name, True) for name in sorted(TINY_TRAINING) if name in list_proxies()
]


def person_like_images(n: int, seed: int, size=(64, 48)) -> torch.Tensor:
    """Seeded photos: a light backdrop, a darker textured block on the torso, noise."""
    generator = torch.Generator().manual_seed(seed)
    h, w = size
    images = 0.85 + 0.1 * torch.rand(n, 3, h, w, generator=generator)
    colour = torch.rand(n, 3, 1, 1, generator=generator) * 0.6
    texture = 0.2 * torch.rand(n, 1, h // 4, w // 4, generator=generator)
    texture = torch.nn.functional.interpolate(texture, size=size, mode="nearest")
    top, bottom, left, right = int(0.3 * h), int(0.8 * h), int(0.25 * w), int(0.75 * w)
    images[:, :, top:bottom, left:right] = (colour + texture)[:, :, top:bottom, left:right].clamp(0, 1)
    return images


@pytest.fixture(scope="module")
def tiny_checkpoints(synthetic_root, tmp_path_factory):
    """name -> final.pt of a tiny training run on the synthetic set, made on first use."""
    data = load_viton(synthetic_root, split="val")
    made = {}

    def get(name: str):
        if name not in made:
            out_dir = tmp_path_factory.mktemp(f"{name}-tiny")
            made[name] = create_proxy(name, **TINY.get(name, {})).train_on(
                data, out_dir, seed=0, progress=False, **TINY_TRAINING[name]
            )
        return made[name]

    return get


@pytest.mark.parametrize("name, trained", CASES, ids=[f"{n}-{'trained' if t else 'untrained'}" for n, t in CASES])
def test_registry_contract(name, trained, tiny_checkpoints):
    spec = f"{name}@{tiny_checkpoints(name)}" if trained else name
    proxy = create_proxy(spec, **TINY.get(name, {})).eval()
    assert isinstance(proxy, Proxy) and proxy.name == name
    images = person_like_images(3, seed=1)
    with torch.no_grad():
        out = proxy(images)
        assert out.ndim == 4 and out.shape[:2] == (3, 3) and out.dtype == torch.float32
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
        assert torch.equal(proxy(images), out), "a proxy must be deterministic"
        one_by_one = torch.cat([proxy(images[i : i + 1]) for i in range(3)])
        assert torch.allclose(one_by_one, out, atol=1e-5), "a batch must give what one-by-one calls give"
    # the fingerprint is a function of name, config and weights: a second instance has the same one
    assert create_proxy(spec, **TINY.get(name, {})).fingerprint() == proxy.fingerprint()
    # any proxy goes in front of a descriptor (query_embedder resizes its output to the descriptor's size)
    from retrieval.descriptors import create_descriptor

    descriptor = create_descriptor("colorhist", image_size=(48, 32))
    vectors = query_embedder(descriptor, proxy)(images)
    assert vectors.shape == (3, descriptor.dim) and torch.isfinite(vectors).all()


def test_trained_and_untrained_forms_differ(tiny_checkpoints):
    for name in TINY_TRAINING:
        untrained = create_proxy(name, **TINY.get(name, {}))
        trained = create_proxy(f"{name}@{tiny_checkpoints(name)}", **TINY.get(name, {}))
        assert untrained.fingerprint() != trained.fingerprint()


def test_registry_errors(tmp_path):
    with pytest.raises(ValueError, match="valid names: .*hp"):
        create_proxy("nope")
    with pytest.raises(ValueError, match="unknown options"):
        PROXIES.create("hp", not_an_option=1)
    with pytest.raises(FileNotFoundError):
        create_proxy(f"hp@{tmp_path / 'missing.pt'}")
    with pytest.raises(ValueError, match="not trainable"):
        create_proxy("none").train_on(None, tmp_path)
    assert {"none", "hp"} <= set(list_proxies())


def test_checkpoint_of_another_proxy_is_refused(tmp_path):
    from retrieval.training import atomic_torch_save

    path = tmp_path / "final.pt"
    atomic_torch_save({"version": 1, "config": {}, "state_dict": {}, "proxy": "paintnet"}, path)
    with pytest.raises(ValueError, match="trained for proxy 'paintnet'"):
        create_proxy("none").load_trained(path)
    atomic_torch_save(
        {"version": 1, "config": {}, "state_dict": {"stray.weight": torch.zeros(1)}, "proxy": "none"}, path
    )
    with pytest.raises(ValueError, match="does not fit proxy 'none'"):
        create_proxy(f"none@{path}")


def test_a_spec_carries_options_with_a_checkpoint(tiny_checkpoints):
    """`NAME[k=v]@final.pt`: the options build the proxy, the checkpoint fills it; keyword options win."""
    checkpoint = tiny_checkpoints("hp")
    proxy = create_proxy(f"hp[localise=true;margin=0.1]@{checkpoint}", margin=0.2)
    assert proxy.uses_parser and proxy.conf["localise"] is True and proxy.conf["margin"] == 0.2
    assert create_proxy("hp[grabcut_iterations=2]").conf["grabcut_iterations"] == 2


def test_hp_reads_larger_and_cuts_out_at_the_descriptor_size(tiny_checkpoints):
    """input_scale 3: photos are read 3x larger (proxy_input_size) and the cut-out comes back at 1/3 of that."""
    from retrieval.proxy_stage import proxy_input_size

    proxy = create_proxy(f"hp[input_scale=3]@{tiny_checkpoints('hp')}").eval()
    assert proxy_input_size(proxy, (64, 48)) == (192, 144) and proxy_input_size(create_proxy("none"), (64, 48)) == (
        64,
        48,
    )
    large = person_like_images(2, seed=4, size=(192, 144))
    with torch.no_grad():
        out = proxy(large)
    assert out.shape == (2, 3, 64, 48) and out.min() >= 0 and out.max() <= 1


def test_hp_reports_the_box_it_cut_the_garment_from(tiny_checkpoints):
    """forward_with_boxes: the output is forward's, and each box is the tight box of the garment mask (x0, y0, x1,
    y1); a proxy that does not crop reports None for every image."""
    from generation.parsing import garment_masks
    from retrieval.garments import mask_bounding_boxes

    proxy = create_proxy(f"hp@{tiny_checkpoints('hp')}").eval()
    images = person_like_images(3, seed=2)
    with torch.no_grad():
        out, boxes = proxy.forward_with_boxes(images)
        assert torch.equal(out, proxy(images))
        masks = garment_masks(images, proxy.parser, 0.5, 5, 0.05)
    tight, nonempty = mask_bounding_boxes(masks > 0.5)
    for box, (top, left, bottom, right), found in zip(boxes, tight.tolist(), nonempty.tolist()):
        assert box == ((left, top, right, bottom) if found else None)
    assert create_proxy("none").forward_with_boxes(images)[1] == [None, None, None]
