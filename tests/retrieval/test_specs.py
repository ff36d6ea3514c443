"""The one spec parser (retrieval/specs.py): NAME, NAME@checkpoint, NAME[KEY=VALUE;...] and globs."""

import pytest

from retrieval.specs import (
    Spec,
    SpecSyntaxError,
    checkpoint_paths,
    expand_specs,
    parse_spec,
    split_specs,
    typed_specs,
)


def test_parse_spec():
    assert parse_spec("gem") == Spec("gem", None, {})
    assert parse_spec("tn@runs/tn/final.pt") == Spec("tn", "runs/tn/final.pt", {})
    assert parse_spec("paintnet[use_perceptual=False; width=0.5;gan_mode=lsgan;sp_image_size=(64, 48)]") == Spec(
        "paintnet",
        None,
        {"use_perceptual": False, "width": 0.5, "gan_mode": "lsgan", "sp_image_size": (64, 48)},
    )
    for bad in ("paintnet[use_perceptual]", "paintnet[x=1", "[x=1]"):
        with pytest.raises(ValueError):
            parse_spec(bad)
    with pytest.raises(SpecSyntaxError, match="expected NAME"):
        parse_spec("paintnet[x=1")


def test_parse_spec_types_by_defaults():
    defaults = {"use_perceptual": True, "sp_image_size": (256, 192), "max_pairs": None}
    spec = parse_spec("paintnet[use_perceptual=false;sp_image_size=128,96;max_pairs=4]", defaults)
    assert spec.options == {"use_perceptual": False, "sp_image_size": (128, 96), "max_pairs": 4}
    assert str(spec) == "paintnet[use_perceptual=False;sp_image_size=(128, 96);max_pairs=4]"
    assert parse_spec(str(spec)) == spec  # the written-back literals read back to the same values, untyped
    with pytest.raises(ValueError, match=r"^--proxies paintnet\[bogus=1\]: bogus=1: unknown option 'bogus'"):
        parse_spec("paintnet[bogus=1]", defaults, source="--proxies paintnet[bogus=1]:")
    assert str(parse_spec("tn@runs/tn/final.pt")) == "tn@runs/tn/final.pt" and str(parse_spec("gem")) == "gem"


def test_options_and_a_checkpoint_together():
    spec = parse_spec("hp[localise=true;input_scale=3]@runs/hp [2]/final.pt")
    assert spec == Spec("hp", "runs/hp [2]/final.pt", {"localise": True, "input_scale": 3})  # brackets in the path
    assert str(spec) == "hp[localise=True;input_scale=3]@runs/hp [2]/final.pt" and parse_spec(str(spec)) == spec
    with pytest.raises(SpecSyntaxError):
        parse_spec("hp[localise=true@runs/final.pt")


def test_split_specs_keeps_commas_inside_brackets():
    assert split_specs("none,paintnet[sp_image_size=128,96;width=0.5], hp,") == [
        "none",
        "paintnet[sp_image_size=128,96;width=0.5]",
        "hp",
    ]


def test_expand_globs_keeps_order_and_checkpoints():
    names = ["colorhist", "gem", "rmac", "sift", "surf"]
    assert expand_specs("s*,gem", names, "descriptor") == ["sift", "surf", "gem"]
    assert expand_specs("*", names, "descriptor") == names
    assert expand_specs(["s*", "sift"], names, "descriptor") == ["sift", "surf"]
    assert expand_specs("gem@runs/x/final.pt,gem", names, "descriptor") == ["gem@runs/x/final.pt", "gem"]
    assert expand_specs("gem[p=4]", names, "descriptor") == ["gem[p=4]"]
    with pytest.raises(ValueError, match="'vgg\\*' matches no descriptor; registered: colorhist, gem, rmac"):
        expand_specs("vgg*", names, "descriptor")
    with pytest.raises(ValueError, match="matches no descriptor"):
        expand_specs("vgg@x.pt", names, "descriptor")


def test_typed_specs_rewrites_only_bracketed_specs():
    defaults = {"paintnet": {"width": 1.0, "use_perceptual": True}}
    assert typed_specs(
        ["none", "paintnet[width=0.5;use_perceptual=no]", "hp@runs/hp/final.pt"], defaults.__getitem__, "--proxies"
    ) == ["none", "paintnet[width=0.5;use_perceptual=False]", "hp@runs/hp/final.pt"]
    with pytest.raises(ValueError, match=r"^--proxies paintnet\[width=0,5\]: width=0,5: expected a number"):
        typed_specs(["paintnet[width=0,5]"], defaults.__getitem__, "--proxies")


def test_checkpoint_paths_finds_nested_and_quoted_checkpoints():
    assert checkpoint_paths("gem") == [] and checkpoint_paths("hp@runs/p/final.pt") == ["runs/p/final.pt"]
    nested = "fused[branches=tn[proxy=hp@p/final.pt]@a/final.pt|gem|tn@b/final.pt;weights=(1, 1, 1)]@f/final.pt"
    assert checkpoint_paths(nested) == ["f/final.pt", "a/final.pt", "p/final.pt", "b/final.pt"]
    # as a bench label writes a fusion: the branches quoted, a branch with options of its own
    quoted = "fused[branches='tn[catalog_blur=(2.0, 4.0);query_flip=True]@r/a/final.pt|tn@r/b/final.pt';weights=None]"
    assert checkpoint_paths(quoted) == ["r/a/final.pt", "r/b/final.pt"]
