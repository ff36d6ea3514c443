"""`street2shop datasets`: every registered format with its spec forms and expected layout."""

from click.testing import CliRunner

from retrieval.datasets import EXPECTED_LAYOUTS, dataset_spec_forms, list_dataset_formats
from street2shop.cli import cli


def test_datasets_lists_every_format_with_its_forms_and_layout():
    result = CliRunner().invoke(cli, ["datasets"])
    assert result.exit_code == 0, result.output
    blocks = result.output.strip().split("\n\n")
    assert len(blocks) == len(list_dataset_formats())
    for name, block in zip(list_dataset_formats(), blocks):
        forms = [form for form in dataset_spec_forms() if form.split(":")[0] == name]
        assert block.splitlines()[0] == " | ".join(forms)
        assert EXPECTED_LAYOUTS[name].splitlines()[0] in block
    assert "street2shop:ROOT | street2shop:ROOT,CATEGORY" in result.output
    assert "validation/\n      image/NNNNNN.jpg\n      annos/NNNNNN.json" in result.output
    assert "Anno/list_bbox_consumer2shop.txt" in result.output and "PID<product>_CLEAN0_IID<image>.jpg" in result.output
