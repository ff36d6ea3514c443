"""The top-level help teaches only commands that exist, and `list` names every registered plugin."""

import re

from click.testing import CliRunner

from generation.proxies import list_proxies
from index import list_index_presets
from retrieval.descriptors import list_descriptors
from street2shop.cli import cli


def test_every_command_the_help_shows_is_registered():
    shown = set(re.findall(r"^\s+street2shop ([a-z-]+)", cli.help, flags=re.MULTILINE))
    assert {"demo", "index", "query", "bench", "list", "datasets"} <= shown
    assert shown - set(cli.commands) == set()


def test_list_names_every_descriptor_proxy_and_index_preset():
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 0, result.output
    listed_descriptors = re.findall(r"^  ([a-z0-9]+)\s", result.output, flags=re.MULTILINE)
    assert listed_descriptors == list_descriptors()
    proxies_line = next(line for line in result.output.splitlines() if line.startswith("proxies:"))
    assert proxies_line.split(":", 1)[1].strip().split(", ") == list_proxies()
    assert result.output.rstrip().endswith(", ".join(list_index_presets()))
