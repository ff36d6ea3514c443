"""`street2shop serve` without the optional extra: one clear error that names the install command."""

import sys

from click.testing import CliRunner

from street2shop.cli import cli


def test_serve_without_the_extra_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError, as when it is not installed
    for name in [name for name in sys.modules if name.startswith("street2shop.service")]:
        monkeypatch.delitem(sys.modules, name)
    result = CliRunner().invoke(cli, ["serve", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "optional 'serve' extra" in result.output and 'pip install -e ".[serve]"' in result.output
