"""`ConfigError`, and Hydra's / OmegaConf's multi-line messages on one line for it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem found."""


def one_line(err: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages on one line (an option list after "...:" joined by commas;
    doc links, the config search path and OmegaConf's key/type trailer dropped)."""
    text = str(getattr(err, "msg", None) or err).split("Config search path:")[0]
    skip = ("See https://", "full_key:", "object_type=", "reference_type=")
    lines = [line.strip() for line in text.splitlines()]
    parts: list[str] = []
    listing = False
    for line in (line for line in lines if line and not line.startswith(skip)):
        if listing and " " not in line:
            parts[-1] += ("" if parts[-1].endswith(":") else ",") + " " + line
            continue
        listing = line.endswith(":")
        parts.append(line)
    out = ""
    for part in parts:
        out = part if not out else f"{out}{' ' if out.endswith('.') else '; '}{part}"
    return out or type(err).__name__
