"""A small named registry shared by descriptors, proxies and other plugins.

DESCRIPTORS = Registry("descriptor")

@DESCRIPTORS.register("gem")
class GeM(Descriptor): ...

DESCRIPTORS.create("gem", p=3.0)   # unknown names raise ValueError listing the valid ones
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, TypeVar

T = TypeVar("T")


class Registry:
    """Maps a plugin name to its factory (usually a class)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(factory: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            setattr(factory, "registry_name", name)
            return factory

        return decorator

    def names(self) -> List[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}") from None

    def create(self, name: str, **conf: Any) -> Any:
        return self.get(name)(**conf)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


def module_fingerprint(name: str, conf: Dict[str, Any], module) -> str:
    """sha256 (16 hex digits) over a plugin's name, JSON config and every tensor of its state dict.

    Stored in index manifests and feature-cache keys, so that features made by another plugin, another
    config or other weights (a refit codebook, a retrained network) are never mixed up.
    """
    import hashlib
    import json

    digest = hashlib.sha256(name.encode())
    digest.update(json.dumps(conf, sort_keys=True, default=list).encode())
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ---- options given as text (`--set KEY=VALUE`, `NAME[KEY=VALUE;...]`) -----------------------------
# Typed by the option's default, never by the look of the text: `ast.literal_eval` made "false" the
# string 'false' (truthy: an ablation silently trained the full model) and "0,5" a tuple.
_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0"})
_NONE = frozenset({"", "none", "null"})


def _unquoted(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _parses_as(kind: type, text: str) -> bool:
    """Whether ``kind(text)`` (int or float) accepts ``text``."""
    try:
        kind(text)
    except ValueError:
        return False
    return True


def _describe(default: Any) -> str:
    """What a value for an option with this default must look like, e.g. 'a number (float)'."""
    if isinstance(default, bool):
        return "true or false (bool)"
    if isinstance(default, int):
        return "a whole number (int)"
    if isinstance(default, float):
        return "a number (float)"
    if isinstance(default, (tuple, list)) and default:
        kinds = sorted({type(item).__name__ for item in default})
        example = ",".join(str(item) for item in default)
        return f"comma-separated values like {example} ({type(default).__name__} of {'/'.join(kinds)})"
    return type(default).__name__


def _guess(text: str) -> Any:
    """Text for an option without a typed default (None, or no default known): None, bool, int, float,
    a bracketed tuple/list, else the string itself."""
    if text.lower() in _NONE:
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if _parses_as(int, text):
        return int(text)
    if _parses_as(float, text):
        return float(text)
    if len(text) >= 2 and (text[0], text[-1]) in (("(", ")"), ("[", "]")):
        items = [_guess(part.strip()) for part in text[1:-1].split(",") if part.strip()]
        return tuple(items) if text[0] == "(" else items
    return _unquoted(text)


def coerce_option(name: str, text: Any, default: Any) -> Any:
    """Parse the text of option `name` as the type of its `default`; anything but text is returned as is.

    bool: true/false/yes/no/1/0 (any case); int: whole numbers only; float: whole or decimal numbers;
    str: the text (surrounding quotes dropped); tuple/list: comma-separated items, each typed like the
    default's items, brackets optional (image_size=128,96); None: none/null/'' -> None, else bool, int,
    float, a bracketed tuple/list or the text.

    Example:
        >>> coerce_option("use_perceptual", "false", True), coerce_option("image_size", "128,96", (64, 48))
        (False, (128, 96))

    Raises:
        ValueError: "NAME=TEXT: expected <type>, got 'TEXT'" (callers prefix where it came from).
    """
    if not isinstance(text, str):
        return text
    value = text.strip()

    def refuse() -> ValueError:
        return ValueError(f"{name}={text}: expected {_describe(default)}, got {text!r}")

    if default is None:
        return _guess(value)
    if isinstance(default, bool):  # before int: bool is an int
        lowered = value.lower()
        if lowered in _TRUE or lowered in _FALSE:
            return lowered in _TRUE
        raise refuse()
    if isinstance(default, int):
        if _parses_as(int, value):
            return int(value)
        raise refuse()
    if isinstance(default, float):
        if _parses_as(float, value):
            return float(value)
        raise refuse()
    if isinstance(default, (tuple, list)):
        inner = value[1:-1] if len(value) >= 2 and (value[0], value[-1]) in (("(", ")"), ("[", "]")) else value
        parts = [part.strip() for part in inner.split(",")]
        if parts and not parts[-1]:  # a trailing comma: "128," is a 1-tuple, as in Python
            parts = parts[:-1]
        if not parts or any(not part for part in parts):
            if not parts and not default:
                return type(default)()
            raise refuse()
        # Items typed like the default's: position by position when the lengths agree, else like its first.
        item_defaults = list(default) if len(default) == len(parts) else [default[0] if default else None] * len(parts)
        try:
            items = [coerce_option(name, part, item_default) for part, item_default in zip(parts, item_defaults)]
        except ValueError:
            raise refuse() from None
        return type(default)(items)
    if isinstance(default, str):
        return _unquoted(value)
    raise refuse()  # a default of another type (a dict, a path object): not settable from text


def typed_options(options: Dict[str, Any], defaults: Dict[str, Any], owner: str) -> Dict[str, Any]:
    """`options` with every text value of a known option coerced (`coerce_option`) against `defaults`.

    For constructors and trainers: a value that arrives as text from any route (an old spec, a JSON
    file) gets the same types as `--set`. Errors name `owner`, e.g. "paintnet option width=0,5: ...".
    """
    typed = dict(options)
    for key, value in options.items():
        if isinstance(value, str) and key in defaults:
            try:
                typed[key] = coerce_option(key, value, defaults[key])
            except ValueError as exc:
                raise ValueError(f"{owner} option {exc}") from None
    return typed


def plugin_conf(plugin: Any, name: str, conf: Dict[str, Any]) -> Dict[str, Any]:
    """The config of a plugin being built: its class's ``default_conf`` updated with ``conf``, typed like
    the defaults (`typed_options`, errors naming ``name``). Descriptors and proxies alike.

    Raises:
        ValueError: an option ``default_conf`` lacks (naming the valid ones).
    """
    defaults = plugin.default_conf
    unknown = set(conf) - set(defaults)
    if unknown:
        raise ValueError(
            f"{type(plugin).__name__} got unknown options {sorted(unknown)}; valid options: {sorted(defaults)}"
        )
    # Text from any route ('false', '0.5') typed like the default: 'false' is truthy as a string.
    return {**defaults, **typed_options(conf, defaults, name)}


def parse_settings(items, defaults=None, source: str = "--set") -> Dict[str, Any]:
    """['width=0.5', 'use_perceptual=false'] -> {'width': 0.5, 'use_perceptual': False}, typed by `defaults`.

    `defaults` maps every valid option name to its default (`coerce_option` types each value); an
    unknown name is refused listing the valid ones. Without `defaults`, each value is guessed (none,
    bool, number, bracketed tuple, else text). Errors start with `source` and the item, e.g.
    "--set width=0,5: expected a number (float), got '0,5'".
    """
    parsed: Dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{source} {item}: expected KEY=VALUE")
        if defaults is None:
            parsed[key] = coerce_option(key, text, None)
            continue
        if key not in defaults:
            raise ValueError(f"{source} {item}: unknown option {key!r}; valid: {', '.join(sorted(defaults))}")
        try:
            parsed[key] = coerce_option(key, text, defaults[key])
        except ValueError as exc:
            raise ValueError(f"{source} {exc}") from None
    return parsed
