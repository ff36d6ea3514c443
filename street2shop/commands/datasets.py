"""`street2shop datasets`: the dataset formats `--dataset` reads, each with its spec forms and expected layout."""

from __future__ import annotations

import click


def describe_formats() -> str:
    """Every registered format: a line of its spec forms, then its expected tree, indented."""
    from retrieval.datasets import EXPECTED_LAYOUTS, dataset_spec_forms, list_dataset_formats

    blocks = []
    for name in list_dataset_formats():
        forms = [form for form in dataset_spec_forms() if form.split(":")[0] == name]
        layout = EXPECTED_LAYOUTS.get(name, "(no layout recorded)")
        blocks.append("\n".join([" | ".join(forms)] + ["  " + line for line in layout.splitlines()]))
    return "\n\n".join(blocks)


@click.command("datasets")
def datasets_command() -> None:
    """List the dataset formats --dataset reads (FORMAT:ARGUMENT), each with the layout it expects on disk."""
    click.echo(describe_formats())


COMMANDS = (datasets_command,)
