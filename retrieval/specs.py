"""The one spelling of a model on the command line and in a grid: a spec.

    gem                                   a registered descriptor or proxy, as built
    tn@runs/tn/final.pt                   with the weights of a training run
    hp[input_scale=3]@runs/hp/final.pt    with options and the weights of a training run
    paintnet[use_perceptual=false;width=0.5]
                                          with options (`;`-separated KEY=VALUE): an ablation to train
    s*, paintnet*, *                      a shell glob over the registered names (`expand_specs`)

Descriptors and proxies are both spec'd, so this lives in the lowest layer that needs it; it never looks
a name up itself: callers pass the registered names (`expand_specs`) and the options' defaults
(`parse_spec`, `typed_specs`). Values are typed as `--set` types them (`retrieval.registry`): by the
option's default when one is given, else guessed (true/false, numbers, `(64, 48)`, `None`, text).

Example:
    >>> parse_spec("paintnet[use_perceptual=false;width=0.5]")
    Spec(name='paintnet', checkpoint=None, options={'use_perceptual': False, 'width': 0.5})
    >>> parse_spec("tn@runs/tn/final.pt")
    Spec(name='tn', checkpoint='runs/tn/final.pt', options={})
    >>> split_specs("none,paintnet[sp_image_size=128,96;width=0.5],hp")
    ['none', 'paintnet[sp_image_size=128,96;width=0.5]', 'hp']
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

from retrieval.registry import parse_settings

_SPEC = re.compile(r"^(?P<name>[^\[\]@;=]+?)\s*(?:\[(?P<options>.*)\])?$")  # options may nest brackets
SPEC_FORMS = "NAME, NAME@path/final.pt, NAME[KEY=VALUE;KEY=VALUE] or NAME[KEY=VALUE;...]@path/final.pt"


class SpecSyntaxError(ValueError):
    """A spec that is none of the `SPEC_FORMS` (a usage error, not a bad value)."""


@dataclass(frozen=True)
class Spec:
    """A parsed spec: the registered name, a checkpoint (NAME@path) or None, and the bracketed options."""

    name: str
    checkpoint: Optional[str] = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def options_text(self) -> str:
        """The options as Python literals, 'use_perceptual=False;sp_image_size=(128, 96)': what `parse_spec`
        reads back to the same values without their defaults."""
        return ";".join(f"{key}={value!r}" for key, value in self.options.items())

    def __str__(self) -> str:
        head = f"{self.name}[{self.options_text}]" if self.options else self.name
        return f"{head}@{self.checkpoint}" if self.checkpoint is not None else head


def split_specs(text: str, separator: str = ",") -> List[str]:
    """Comma-separated specs; a comma inside brackets stays: 'paintnet[sp_image_size=128,96],none'.

    With ``separator=";"`` the same splits a spec's options, so that an option's value may be a spec with
    options of its own: 'fused[branches=sift[n_clusters=4;pca_dim=32]|gem;weights=None]'.
    """
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        elif char == separator and depth <= 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _split_checkpoint(text: str) -> Tuple[str, str]:
    """'NAME[k=v]@path' -> ('NAME[k=v]', 'path') at the first '@' outside brackets: an option's value may name a
    checkpoint itself (`tn[proxy=hp@runs/parser/final.pt]`), and a path may hold brackets."""
    depth = 0
    for i, char in enumerate(text):
        depth += (char == "[") - (char == "]")
        if char == "@" and depth == 0:
            return text[:i], text[i + 1 :]
    return text, ""


def checkpoint_paths(text: str) -> List[str]:
    """Every checkpoint a spec names: its own and those of the specs inside its options, at any depth.

    Example:
        >>> checkpoint_paths("fused[branches=tn[proxy=hp@p/final.pt]@a/final.pt|gem;weights=None]@f/final.pt")
        ['f/final.pt', 'a/final.pt', 'p/final.pt']
    """
    head, checkpoint = _split_checkpoint(text)
    paths = [checkpoint.strip()] if checkpoint.strip() else []
    match = _SPEC.match(head.strip())
    for item in split_specs((match["options"] or "") if match else "", separator=";"):
        value = item.partition("=")[2].strip()
        if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":  # a quoted value, as a label writes it
            value = value[1:-1]
        paths += [path for part in split_specs(value, separator="|") if "@" in part for path in checkpoint_paths(part)]
    return paths


def parse_spec(text: str, defaults: Optional[Mapping[str, Any]] = None, source: Optional[str] = None) -> Spec:
    """'NAME', 'NAME@path/final.pt', 'NAME[k=v;k=v]' or 'NAME[k=v;k=v]@path/final.pt' -> Spec.

    With `defaults` (option -> default, e.g. a model's config and training options) each value is typed
    by its default and an unknown option is refused naming the valid ones; without, each value is
    guessed (`retrieval.registry.coerce_option` with no default). 'NAME[k=v]@path/final.pt' is a checkpoint
    loaded into the plugin built with those options (e.g. `hp[localise=true]@runs/parser/final.pt`).

    Raises:
        SpecSyntaxError: brackets that do not close the spec, or no name.
        ValueError: an option without `=`, a value of the wrong type, an unknown option; the message
            starts with `source` (default "spec 'TEXT':").
    """
    head, checkpoint = _split_checkpoint(text)
    match = _SPEC.match(head.strip())
    if not match:
        raise SpecSyntaxError(f"bad spec {text!r}: expected {SPEC_FORMS}")
    items = split_specs(match["options"] or "", separator=";")
    # The same typing as --set: 'false' and False are one option (and one checkpoint key).
    options = parse_settings(items, None if defaults is None else dict(defaults), source=source or f"spec {text!r}:")
    return Spec(match["name"], checkpoint.strip() or None, options)


def typed_specs(
    specs: Sequence[str], defaults_of: Callable[[str], Mapping[str, Any]], source: str = "spec"
) -> List[str]:
    """Each 'NAME[KEY=VALUE;...]' spec with its values typed by `defaults_of(NAME)`, written back as Python
    literals ('paintnet[use_perceptual=false]' -> "paintnet[use_perceptual=False]"); other specs as given.

    What a grid hands on (`benchmarks.reproduce.ensure_trained` reads it back with `parse_spec`): a wrong
    type or an unknown option is refused here, before any work, with errors starting "SOURCE SPEC:".
    """
    typed = []
    for spec in specs:
        if "[" not in spec or _split_checkpoint(spec)[1]:
            typed.append(spec)
            continue
        name = spec.partition("[")[0].strip()
        parsed = parse_spec(spec, defaults_of(name), source=f"{source} {spec}:")
        typed.append(f"{parsed.name}[{parsed.options_text}]")
    return typed


def expand_specs(patterns: Union[str, Sequence[str]], registered_names: Sequence[str], what: str) -> List[str]:
    """Comma-separated specs or shell globs ('*', 'paintnet*', 's?ft') -> specs of registered names, in order.

    A 'NAME@checkpoint' or 'NAME[...]' entry is kept as given (its NAME must be registered); duplicates
    are dropped. `patterns` may be one comma-separated text or a list of entries.

    Raises:
        ValueError: an entry that matches nothing: "'vgg*' matches no descriptor; registered: ...".
    """
    names = list(registered_names)
    entries = split_specs(patterns) if isinstance(patterns, str) else [p.strip() for p in patterns if p.strip()]
    chosen: List[str] = []
    for pattern in entries:
        base = pattern.split("@")[0].split("[")[0]
        if "@" in pattern or "[" in pattern:  # a checkpoint or options (paintnet[use_perceptual=False]): as given
            matches = [pattern] if base in names else []
        else:
            matches = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            raise ValueError(f"{pattern!r} matches no {what}; registered: {', '.join(names)}")
        chosen += [m for m in matches if m not in chosen]
    return chosen
