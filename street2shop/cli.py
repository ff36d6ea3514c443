"""The `street2shop` command line: the group, its error handling, `list` and `demo`; the other commands live in
`street2shop.commands` (one module per job). It parses and calls; the work is in the layers below."""

from __future__ import annotations

import logging
import pickle
import traceback

import click

from street2shop.commands import bench, datasets, pipeline, serve, train
from street2shop.commands.options import cache_dir_path, opt, split_list, whole

# Errors with a message written for the user (a bad option, a missing or damaged file): "error: MESSAGE",
# exit 2. Anything else is a bug or an unforeseen failure: its type is named too, exit 1.
EXPECTED_ERRORS = (ValueError, KeyError, RuntimeError, OSError, pickle.UnpicklingError, EOFError)
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report a Ctrl-C


def _error_text(exc: BaseException) -> str:
    """The message of an exception on one line; an OSError from the system as 'PATH: reason'."""
    if isinstance(exc, OSError) and exc.filename is not None:
        where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else f"{exc.filename}"
        text = f"{where}: {exc.strerror or exc}"
    elif isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]  # str(KeyError) would quote the message
    else:
        text = str(exc)
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


class Street2shopGroup(click.Group):
    """The command group that turns every error into one line on stderr and a non-zero exit.

    Done here once, around every command, so no command needs its own try/except: expected errors
    print "error: MESSAGE" (exit 2), any other "error: TYPE: MESSAGE (run with -v for the traceback)"
    (exit 1), Ctrl-C a short line (exit 130); `street2shop -v ...` prints the traceback first.
    Click's own errors (usage, exit 2) pass through as click prints them.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            if ctx.params.get("verbose"):
                click.echo(traceback.format_exc(), err=True, nl=False)
            click.echo("\ninterrupted: run the same command again to resume from what is cached", err=True)
            ctx.exit(INTERRUPTED_EXIT)
        except Exception as exc:  # noqa: BLE001  (the last resort: nothing reaches the user as a bare traceback)
            verbose = bool(ctx.params.get("verbose"))
            if verbose:
                click.echo(traceback.format_exc(), err=True, nl=False)
            if isinstance(exc, EXPECTED_ERRORS):
                click.echo(f"error: {_error_text(exc)}", err=True)
                ctx.exit(2)
            hint = "" if verbose else " (run with -v for the traceback)"
            click.echo(f"error: {type(exc).__name__}: {_error_text(exc)}{hint}", err=True)
            ctx.exit(1)


@click.group(cls=Street2shopGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug) and the traceback of an error.")
@click.version_option(package_name="street2shop")
def cli(verbose: int) -> None:
    """Street-to-shop retrieval: find the product a person wears, from a photo, in a shop's catalog.

    \b
    Typical session:
      street2shop demo                                   # everything on the embedded synthetic set
      street2shop index --catalog viton:../shared/data/viton --descriptor gem --out shop-index
      street2shop query --index shop-index photo1.jpg photo2.jpg --k 5
      street2shop bench --dataset viton:../shared/data/viton --descriptors sift,rmac,gem
      street2shop list                                   # descriptors, proxies, index presets
      street2shop datasets                               # dataset formats and their layouts
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@cli.command("list")
def list_plugins() -> None:
    """List the registered descriptors, proxies and index presets."""
    from generation.proxies import list_proxies
    from index import list_index_presets
    from retrieval.descriptors import DESCRIPTORS, list_descriptors

    click.echo("descriptors:")
    for name in list_descriptors():
        cls = DESCRIPTORS.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        click.echo(f"  {name:<10} {cls.kind:<7} {doc}")
    click.echo("proxies:       " + ", ".join(list_proxies()))
    click.echo("index presets: " + ", ".join(list_index_presets()))


@cli.command("demo")
@whole("--products", 120, 1, "Size of the generated synthetic set.")
@opt("--descriptors", default="colorhist,sift,rmac,gem")
@opt("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--cache-dir", default=None, help="Where the synthetic set, indexes and features go.")
def demo_command(products, descriptors, device, cache_dir) -> None:
    """Build the embedded synthetic street-to-shop set, index its catalog, query it, print mAP@k.

    Everything runs offline on this machine in about a minute on a laptop CPU.
    """
    from street2shop.engine import run_demo

    run_demo(products, split_list(descriptors), device, cache_dir_path(cache_dir), echo=click.echo)


for _module in (pipeline, bench, train, serve, datasets):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main() -> None:
    cli(prog_name="street2shop")


if __name__ == "__main__":
    main()
