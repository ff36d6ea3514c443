"""Options given as text (`--set KEY=VALUE`, `NAME[KEY=VALUE;...]`) are typed by the option's default."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmarks.reproduce import grid_specs, option_defaults
from retrieval.registry import coerce_option, parse_settings, typed_options
from retrieval.specs import parse_spec, split_specs
from street2shop.cli import cli


@pytest.mark.parametrize(
    "text, default, expected",
    [
        # bool: true/false/yes/no/1/0, any case
        ("false", True, False),
        ("False", True, False),
        ("FALSE", True, False),
        ("no", True, False),
        ("0", True, False),
        ("true", False, True),
        ("True", False, True),
        ("yes", False, True),
        ("YES", False, True),
        ("1", False, True),
        (" false ", True, False),
        # int: whole numbers only
        ("3", 1, 3),
        ("-2", 1, -2),
        ("+7", 1, 7),
        ("1000", 1, 1000),
        # float: whole or decimal numbers
        ("0.5", 1.0, 0.5),
        ("2", 1.0, 2.0),
        ("1e-3", 1.0, 0.001),
        ("-0.25", 1.0, -0.25),
        # str: the text, surrounding quotes dropped
        ("lsgan", "bce", "lsgan"),
        ("'lsgan'", "bce", "lsgan"),
        ('"a b"', "bce", "a b"),
        ("false", "true", "false"),
        ("123", "bce", "123"),
        # tuple/list: comma-separated, brackets optional, items typed like the default's
        ("128,96", (64, 48), (128, 96)),
        ("(128, 96)", (64, 48), (128, 96)),
        ("[128,96]", (64, 48), (128, 96)),
        ("0.5,1.0", (0.7, 1.0, 1.4), (0.5, 1.0)),
        ("2,2,2,2", (1, 1, 1, 1), (2, 2, 2, 2)),
        ("3,", (1, 1), (3,)),
        ("1,2", [0], [1, 2]),
        # None default: none/null/'' -> None, else bool, int, float, bracketed tuple/list, text
        ("none", None, None),
        ("None", None, None),
        ("null", None, None),
        ("", None, None),
        ("500", None, 500),
        ("0.5", None, 0.5),
        ("false", None, False),
        ("True", None, True),
        ("(64, 48)", None, (64, 48)),
        ("[1, 2]", None, [1, 2]),
        ("runs/hp/final.pt", None, "runs/hp/final.pt"),
    ],
)
def test_coerce_option_golden_values(text, default, expected):
    value = coerce_option("opt", text, default)
    assert value == expected and type(value) is type(expected)
    if isinstance(expected, (tuple, list)):
        assert [type(v) for v in value] == [type(v) for v in expected]


@pytest.mark.parametrize(
    "text, default, message",
    [
        ("0,5", 1.0, "width=0,5: expected a number (float), got '0,5'"),
        ("abc", 1.0, "width=abc: expected a number (float), got 'abc'"),
        ("1.5", 1, "width=1.5: expected a whole number (int), got '1.5'"),
        ("1e3", 1, "width=1e3: expected a whole number (int), got '1e3'"),
        ("true", 1, "width=true: expected a whole number (int), got 'true'"),
        ("maybe", True, "width=maybe: expected true or false (bool), got 'maybe'"),
        ("2", True, "width=2: expected true or false (bool), got '2'"),
        ("128x96", (64, 48), "width=128x96: expected comma-separated values like 64,48 (tuple of int), got '128x96'"),
        (
            "128,9.5",
            (64, 48),
            "width=128,9.5: expected comma-separated values like 64,48 (tuple of int), got '128,9.5'",
        ),
        ("", (64, 48), "width=: expected comma-separated values like 64,48 (tuple of int), got ''"),
    ],
)
def test_coerce_option_refuses_a_wrong_type_naming_option_value_and_type(text, default, message):
    with pytest.raises(ValueError) as caught:
        coerce_option("width", text, default)
    assert str(caught.value) == message


def test_coerce_option_leaves_values_that_are_not_text():
    assert coerce_option("width", 0.5, 1.0) == 0.5
    assert coerce_option("image_size", [64, 48], (64, 48)) == [64, 48]  # a manifest's JSON list stays a list


def test_parse_settings_types_by_defaults_and_refuses_unknown_names():
    defaults = {"width": 1.0, "use_perceptual": True, "gan_mode": "bce", "sp_image_size": (256, 192), "max_pairs": None}
    assert parse_settings(
        ["width=0.5", "use_perceptual=false", "gan_mode=lsgan", "sp_image_size=128,96", "max_pairs=500"], defaults
    ) == {"width": 0.5, "use_perceptual": False, "gan_mode": "lsgan", "sp_image_size": (128, 96), "max_pairs": 500}
    with pytest.raises(ValueError, match=r"^--set width=0,5: expected a number \(float\), got '0,5'$"):
        parse_settings(["width=0,5"], defaults)
    with pytest.raises(
        ValueError, match=r"^--set bogus=1: unknown option 'bogus'; valid: gan_mode, max_pairs, sp_image_size"
    ):
        parse_settings(["bogus=1"], defaults)
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_settings(["nonsense"], defaults)


def test_parse_settings_without_defaults_guesses_as_before():
    assert parse_settings(["width=0.5", "use_perceptual=False", "gan_mode=lsgan", "sp_image_size=(64, 48)"]) == {
        "width": 0.5,
        "use_perceptual": False,
        "gan_mode": "lsgan",
        "sp_image_size": (64, 48),
    }
    assert parse_settings(["use_perceptual=false"]) == {"use_perceptual": False}  # not the truthy 'false'


def test_typed_options_names_the_owner():
    assert typed_options({"flag": "no", "other": 3}, {"flag": True}, "tiny") == {"flag": False, "other": 3}
    with pytest.raises(ValueError, match=r"^tiny option flag=maybe: expected true or false \(bool\)"):
        typed_options({"flag": "maybe"}, {"flag": True}, "tiny")


def test_model_constructors_type_text_options():
    """A string that reaches a descriptor or proxy by any route is typed (or refused) there too."""
    from generation.proxies import Proxy
    from retrieval.descriptors import create_descriptor

    descriptor = create_descriptor("colorhist", bins="8,4,4", white_threshold="0.9")
    assert descriptor.conf["bins"] == (8, 4, 4) and descriptor.conf["white_threshold"] == 0.9
    with pytest.raises(ValueError, match=r"colorhist option white_threshold=high: expected a number \(float\)"):
        create_descriptor("colorhist", white_threshold="high")

    class Tiny(Proxy):
        default_conf = {"use_it": True, "size": (64, 48), "mode": "bce", "parser": None}

    tiny = Tiny(use_it="false", size="32,24", mode="lsgan", parser="runs/hp/final.pt")
    assert tiny.conf == {"use_it": False, "size": (32, 24), "mode": "lsgan", "parser": "runs/hp/final.pt"}


def test_training_options_are_typed_against_the_trainer_config():
    from retrieval.training import training_config

    config = training_config("pix2pix", {"epochs": "3", "lr": "1e-3", "max_pairs": "8", "gan_mode": "lsgan"})
    assert (config.epochs, config.lr, config.max_pairs, config.gan_mode) == (3, 1e-3, 8, "lsgan")
    with pytest.raises(ValueError, match=r"pix2pix training option epochs=2.5: expected a whole number \(int\)"):
        training_config("pix2pix", {"epochs": "2.5"})
    with pytest.raises(ValueError, match="unknown options"):
        training_config("pix2pix", {"nope": "1"})


def test_training_defaults_come_from_each_registered_trainer():
    from generation.proxies import PROXIES, list_proxies
    from retrieval.descriptors import DESCRIPTORS, list_descriptors
    from retrieval.training import training_defaults

    list_proxies(), list_descriptors()
    paintnet = training_defaults(PROXIES.get("paintnet"))  # PaintNetTrainConfig
    assert paintnet["max_pairs"] is None and paintnet["sp_epochs"] == 5 and "seed" not in paintnet
    assert training_defaults(PROXIES.get("pix2pix"))["l1_weight"] == 100.0  # Pix2PixTrainConfig
    assert training_defaults(DESCRIPTORS.get("tn"))["miner"] == "batch_hard"  # TNTrainConfig
    assert training_defaults(PROXIES.get("hp"))["image_size"] == (128, 96)  # ParserTrainConfig
    assert training_defaults(DESCRIPTORS.get("l2net"))["garment_loss"] == "infonce"  # L2NetTrainConfig
    assert training_defaults(DESCRIPTORS.get("gem")) == {}  # nothing to train


def test_bench_specs_are_split_at_top_level_commas_and_typed():
    assert split_specs("none,paintnet[sp_image_size=128,96;width=0.5],hp") == [
        "none",
        "paintnet[sp_image_size=128,96;width=0.5]",
        "hp",
    ]
    typed = grid_specs(
        ["none", "paintnet[use_perceptual=false;width=0.5;sp_image_size=128,96;max_pairs=4]", "hp@runs/hp/final.pt"],
        "proxy",
        "--proxies",
    )
    assert typed == [
        "none",
        "paintnet[use_perceptual=False;width=0.5;sp_image_size=(128, 96);max_pairs=4]",
        "hp@runs/hp/final.pt",
    ]
    # what ensure_trained reads: the typed values, exactly
    assert parse_spec(typed[1]).options == {
        "use_perceptual": False,
        "width": 0.5,
        "sp_image_size": (128, 96),
        "max_pairs": 4,
    }
    with pytest.raises(
        ValueError, match=r"^--proxies paintnet\[width=0,5\]: width=0,5: expected a number \(float\), got '0,5'$"
    ):
        grid_specs(["paintnet[width=0,5]"], "proxy", "--proxies")
    with pytest.raises(ValueError, match="unknown option 'bogus'"):
        grid_specs(["paintnet[bogus=1]"], "proxy", "--proxies")
    assert "use_perceptual" in option_defaults("proxy", "paintnet") and "max_pairs" in option_defaults(
        "proxy", "paintnet"
    )


def test_cli_set_refuses_a_wrong_type_before_any_work(tmp_path, monkeypatch):
    import retrieval.datasets

    monkeypatch.setattr(
        retrieval.datasets, "load_dataset", lambda *a, **k: pytest.fail("loaded data before checking --set")
    )
    runner = CliRunner()
    for value, message in [
        ("width=0,5", "error: --set width=0,5: expected a number (float), got '0,5'"),
        ("use_perceptual=maybe", "error: --set use_perceptual=maybe: expected true or false (bool), got 'maybe'"),
        ("sp_epochs=1.5", "error: --set sp_epochs=1.5: expected a whole number (int), got '1.5'"),
        ("bogus=1", "unknown option 'bogus'"),
    ]:
        result = runner.invoke(
            cli, ["train", "paintnet", "--dataset", "synthetic:8", "--out", str(tmp_path / "run"), "--set", value]
        )
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert message in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    result = runner.invoke(cli, ["train", "paintnet", "--out", str(tmp_path / "run"), "--set", "nonsense"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output


def test_cli_set_false_reaches_the_model_as_false(tmp_path, monkeypatch, synthetic_root):
    """The hostile case: `--set use_perceptual=false` used to build the full model (the string is truthy)."""
    import generation.proxies

    seen = {}

    class Fake:
        trainable = True

        def to(self, device):
            return self

        def train_on(self, data, out_dir, **options):
            seen["options"] = options
            return Path(out_dir) / "final.pt"

    def fake_create(name, **conf):
        seen["name"], seen["conf"] = name, conf
        return Fake()

    monkeypatch.setattr(generation.proxies, "create_proxy", fake_create)
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "paintnet",
            "--dataset",
            f"viton:{synthetic_root}",
            "--out",
            str(tmp_path / "run"),
            "--set",
            "use_perceptual=false",
            "--set",
            "width=0.5",
            "--set",
            "sp_image_size=128,96",
            "--set",
            "max_pairs=4",
            "--set",
            "sp_epochs=1",
            "--epochs",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert seen["conf"] == {"use_perceptual": False, "width": 0.5, "sp_image_size": (128, 96)}
    assert seen["options"]["max_pairs"] == 4 and seen["options"]["sp_epochs"] == 1 and seen["options"]["epochs"] == 1


def test_cli_bench_bracket_options_are_typed(tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "--dataset",
            "synthetic:8",
            "--proxies",
            "paintnet[width=0,5]",
            "--out",
            str(tmp_path),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: --proxies paintnet[width=0,5]: width=0,5: expected a number (float), got '0,5'" in result.output


def _as_text(value):
    """How a user writes a value on the command line: 128,96 for a pair, false for False."""
    if isinstance(value, (tuple, list)):
        return ",".join(str(item) for item in value)
    return "none" if value is None else str(value)


@pytest.mark.parametrize("kind", ["descriptor", "proxy"])
def test_every_registered_option_can_be_set_from_text(kind):
    """Each default of every descriptor and proxy (model and training options) reads back from its own text."""
    from generation.proxies import list_proxies
    from retrieval.descriptors import list_descriptors

    names = list_descriptors() if kind == "descriptor" else list_proxies()
    for name in names:
        for option, default in option_defaults(kind, name).items():
            assert coerce_option(option, _as_text(default), default) == default, (name, option, default)
