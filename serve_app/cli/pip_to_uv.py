"""Turn this machine's pip configuration into ``uv pip install`` options (Makefile helper).

``make install`` uses uv (parallel downloads and installs: the first ``make run`` spent
most of its 270 s in pip resolving and installing one package at a time), but uv does not
read pip's configuration. Where pip is set up to use a local mirror, a wheel directory or
a constraints file (``pip config list``: files and ``PIP_*`` variables), uv must be given
the same, or it would resolve against a different world (e.g. a CUDA torch from PyPI
instead of the local CPU wheel). This prints one uv option per line; it exits 3 and says
why on stderr when the configuration holds something uv cannot honour, and the Makefile
then installs with pip as before.

Runs on a bare interpreter (standard library only, by path, before anything is
installed)::

    python serve_app/cli/pip_to_uv.py [PIP_PYTHON]
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from typing import Iterable

__all__ = ["UnsupportedPipConfig", "parse_pip_config", "uv_options"]

#: pip option -> uv option (both take a list of values; pip separates them by spaces).
_LISTS = {
    "index-url": "--default-index",
    "extra-index-url": "--index",
    "find-links": "--find-links",
    "constraint": "--constraints",
}
#: Options that change nothing about what gets installed (or that uv handles alike).
_HARMLESS = {
    "default-timeout", "timeout", "disable-pip-version-check",
    "progress-bar", "no-cache-dir", "cache-dir", "retries", "root-user-action",
    "no-input", "quiet", "verbose", "no-color", "break-system-packages",
}


class UnsupportedPipConfig(ValueError):
    """The pip configuration has a setting uv would not apply the same way."""


def parse_pip_config(text: str) -> dict[str, list[str]]:
    """``pip config list`` output -> option name -> values (any section; later wins).

    Lines look like ``global.find-links='/opt/wheels'`` or ``:env:.find-links='/x'``
    (the section ``:env:`` is a ``PIP_*`` variable, which pip lets override the files).
    """
    found: dict[str, tuple[int, list[str]]] = {}
    for line in text.splitlines():
        if "=" not in line:
            continue
        key, _, raw = line.partition("=")
        section, _, name = key.strip().rpartition(".")
        if section not in ("global", "install", ":env:", ":env:."):
            continue
        values = shlex.split(raw.strip().strip("'").strip('"')) if raw.strip() else []
        rank = {"global": 0, "install": 1}.get(section, 2)
        if name not in found or rank >= found[name][0]:
            found[name] = (rank, values)
    return {name: values for name, (_, values) in found.items()}


def uv_options(config: dict[str, list[str]], extra_constraints: Iterable[str] = ()) -> list[str]:
    """uv options meaning what ``config`` means to pip.

    pip takes the best version across every index and link; uv takes the first index
    that has the package unless told ``--index-strategy unsafe-best-match``, so that is
    always passed when there is more than one source.

    Raises:
        UnsupportedPipConfig: for a setting with no uv equivalent (e.g. ``no-index``,
            ``trusted-host``, ``pre``): the caller falls back to pip.
    """
    out: list[str] = []
    sources = 0
    for name, values in config.items():
        if name == "cert":  # a CA bundle: uv reads the system's store instead of its own
            out.append("--system-certs")
        elif name in _LISTS:
            for value in values:
                out += [_LISTS[name], value]
            if name != "constraint":
                sources += len(values)
        elif name not in _HARMLESS:
            raise UnsupportedPipConfig(f"pip setting {name!r} has no uv equivalent here")
    for path in extra_constraints:
        out += ["--constraints", path]
    if sources:
        out += ["--index-strategy", "unsafe-best-match"]
    return out


def main(argv: list[str]) -> int:
    python = argv[0] if argv else sys.executable
    try:
        text = subprocess.run([python, "-m", "pip", "config", "list"], check=True,
                              capture_output=True, text=True).stdout
        options = uv_options(parse_pip_config(text))
    except (OSError, subprocess.CalledProcessError, UnsupportedPipConfig) as exc:
        print(f"pip_to_uv: {exc}; installing with pip", file=sys.stderr)
        return 3
    print("\n".join(options))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
