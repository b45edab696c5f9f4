"""The state's manifest and the integrity of its files, without torch.

What `mergestream status` needs (the manifest's format, the state's health, a full verification
of the recorded checksums) lives here and imports nothing heavy, so `status` answers at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import struct
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import StateError
from ..io.checksum import file_crc32
from ..options import STATE_DTYPE_NAMES

MANIFEST = "manifest.json"
LOCK = "lock"

FORMAT = "mergestream-state"
# 3: each generation records its tensors' forms (`forms`: factored or zero; absent = dense, see
# `step/forms.py`) and factor part files beside the dense ones; a state records whether it may
# keep factors at all (`lowrank`). 2: the manifest lists the generation's part files with
# checksums (`parts`); 1 had one file per state kind and no checksums. States of versions 1 and
# 2 are dense: they are read as they are and written as version 3 by their next step.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)

# Every field a manifest must have, with its JSON type, so a damaged manifest is named as such
# instead of failing later with a KeyError.
REQUIRED_FIELDS: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("method", dict),
    ("method.name", str),
    ("method.params", dict),
    ("state_dtype", str),
    ("base", dict),
    ("base.path", str),
    ("base.files", list),
    ("step", int),
    ("generation", (int, type(None))),
    ("scalars", dict),
    ("ledger", list),
    ("created", str),
)


def check_format(manifest: Any, where: object) -> None:
    """Refuse a manifest this version cannot read, before anything relies on its contents."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StateError(f"{where}: not a mergestream state manifest")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise StateError(
            f"{where}: state format version {version} was written by mergestream "
            f"{manifest.get('mergestream_version', '?')}; this mergestream ({__version__}) reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}"
            + ("; upgrade mergestream to use this state" if newer else "")
        )
    for key, kind in REQUIRED_FIELDS:
        value: Any = manifest
        for part in key.split("."):
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:
            raise StateError(f"{where}: the state manifest lacks {key!r}; it is damaged")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise StateError(
                f"{where}: the state manifest's {key!r} is {type(value).__name__}, not "
                f"{_type_names(kind)}; it is damaged"
            )
    if manifest["state_dtype"] not in STATE_DTYPE_NAMES:
        raise StateError(
            f"{where}: the state manifest's state_dtype {manifest['state_dtype']!r} is not one of "
            f"{', '.join(STATE_DTYPE_NAMES)}; it is damaged"
        )
    parts = manifest.get("parts")
    if version >= 2 and manifest["generation"] is not None and not isinstance(parts, list):
        raise StateError(f"{where}: the state manifest lacks 'parts'; it is damaged")
    if not isinstance(manifest.get("lowrank", False), bool):
        raise StateError(
            f"{where}: the state manifest's 'lowrank' is not true or false; it is damaged"
        )
    read_forms(manifest, where)  # refuses a damaged record
    check_consistency(manifest, where)


_MISSING = object()


# ------------------------------------------------------------------------------------ forms

DENSE, FACTORED, ZERO = "dense", "factored", "zero"


@dataclass(frozen=True)
class TensorForm:
    """How one tensor's state is stored in a generation (see `step/forms.py`): `dense` (m×n
    in the state's dtype), `factored` (a thin SVD of rank `rank` <= `width`, float64, in
    factor part files, each factor `width` columns wide) or `zero` (no bytes)."""

    kind: str = DENSE
    rank: int = 0
    width: int = 0

    def to_json(self) -> dict[str, Any]:
        if self.kind == FACTORED:
            return {"form": FACTORED, "rank": self.rank, "width": self.width}
        return {"form": self.kind}


DENSE_FORM = TensorForm()
ZERO_FORM = TensorForm(ZERO)


def read_forms(manifest: Mapping[str, Any], where: object = "<manifest>") -> dict[str, TensorForm]:
    """The forms of the manifest's generation: tensor name -> form, for every tensor that is
    not dense (a name absent is dense; states before format 3 are dense throughout)."""
    record = manifest.get("forms")
    if record is None:
        return {}
    if not isinstance(record, dict):
        raise StateError(f"{where}: the state manifest's 'forms' is not an object; it is damaged")
    forms = {}
    for name, entry in record.items():
        kind = entry.get("form") if isinstance(entry, dict) else None
        if kind == ZERO:
            forms[name] = ZERO_FORM
            continue
        rank, width = (entry.get("rank"), entry.get("width")) if kind == FACTORED else (0, 0)
        valid = all(isinstance(x, int) and not isinstance(x, bool) for x in (rank, width))
        if kind != FACTORED or not valid or not 0 <= rank <= width:
            raise StateError(
                f"{where}: the state manifest's form of tensor {name!r} is {entry!r}, not "
                "{'form': 'zero'} or {'form': 'factored', 'rank': k, 'width': w} with "
                "0 <= k <= w; it is damaged"
            )
        forms[name] = TensorForm(FACTORED, rank, width)
    return forms


def keeps_factors(manifest: Mapping[str, Any]) -> bool:
    """Whether the state may keep tensors factored or zero (`lowrank`, chosen at init; states
    created dense-only, and every state before format 3, are dense throughout)."""
    return bool(manifest.get("lowrank", False))


def forms_record(forms: Mapping[str, TensorForm]) -> dict[str, dict[str, Any]]:
    """The manifest's `forms`: every tensor that is not dense, in the given order."""
    return {name: form.to_json() for name, form in forms.items() if form.kind != DENSE}

# Written with every manifest: the SHA-256 of the rest of it (see `manifest_checksum`).
CHECKSUM = "checksum"

EDITED = (
    "it was changed outside mergestream (edited by hand, or damaged); undo the change or "
    "restore the file from a backup (to merge with other settings, init a new state)"
)


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON, less its checksum and the base's path: a base
    that moved may be pointed to by editing its path, since every add and export checks the
    base's content against the fingerprint recorded at init."""
    body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != CHECKSUM}))
    if isinstance(body.get("base"), dict):
        body["base"].pop("path", None)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def seal_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest as written to disk: with its checksum (replacing any it had)."""
    sealed = {k: v for k, v in manifest.items() if k != CHECKSUM}
    sealed[CHECKSUM] = manifest_checksum(sealed)
    return sealed


def check_consistency(manifest: Mapping[str, Any], where: object) -> None:
    """Refuse a manifest that was changed outside mergestream: its step, ledger, scalars and
    generation must agree (what each step writes together), and its checksum, where it has
    one, must match (manifests written before checksums gain one at their next write)."""
    file = where if str(where).startswith("<") else Path(str(where)) / MANIFEST
    step, ledger = manifest["step"], manifest["ledger"]
    if step != len(ledger):
        raise StateError(
            f"{file}: step is {step} but the ledger records {len(ledger)} steps; {EDITED}"
        )
    for number, entry in enumerate(ledger, start=1):
        if not isinstance(entry, dict) or entry.get("step") != number:
            raise StateError(
                f"{file}: ledger entry {number} is not a record of step {number}; {EDITED}"
            )
    last = ledger[-1].get("scalars") if ledger else None
    if isinstance(last, dict) and last != manifest["scalars"]:
        raise StateError(
            f"{file}: scalars {_scalars(manifest['scalars'])} differ from those the ledger "
            f"recorded at step {step} ({_scalars(last)}); {EDITED}"
        )
    if (manifest["generation"] is None) != (step == 0):
        raise StateError(
            f"{file}: generation {manifest['generation']} does not fit step {step}; {EDITED}"
        )
    recorded = manifest.get(CHECKSUM)
    if recorded is not None and recorded != manifest_checksum(manifest):
        raise StateError(
            f"{file}: its content does not match the checksum written with it; {EDITED}"
        )


def _scalars(scalars: Mapping[str, Any]) -> str:
    return ", ".join(f"{name}={value}" for name, value in scalars.items())


def _type_names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {dict: "an object", str: "a string", list: "a list", int: "an integer"}
    return " or ".join(names.get(k, "null") for k in kinds)


def generation_dir_name(generation: int) -> str:
    return f"gen-{generation:06d}"


def check_part_header(path: Path, part: Mapping[str, Any]) -> str | None:
    """What is wrong with a part file's size or header against its manifest record, or None.
    Records of format 1 (no checksums) pass."""
    expected_size = part.get("bytes")
    if expected_size is not None:
        size = path.stat().st_size
        if size != expected_size:
            return f"the file has {size} bytes, {expected_size} were written"
    expected_header = part.get("header_sha256")
    if expected_header is not None:
        with open(path, "rb") as f:
            prefix = f.read(8)
            header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
            digest = hashlib.sha256(prefix + f.read(header_len)).hexdigest()
        if digest != expected_header:
            return "its header does not match the checksum recorded when it was written"
    return None


def verify_parts(root: Path, parts: list[Mapping[str, Any]]) -> list[str]:
    """Every problem found by reading each part file whole against its manifest record
    (missing file, size, header, each tensor's CRC-32); [] when all is intact. Reads the
    data in chunks: memory stays small whatever the state's size. Needs no torch."""
    problems = []
    for part in parts:
        path = root / part["file"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        problem = check_part_header(path, part)
        if problem is not None:
            problems.append(f"{path}: {problem}")
            continue
        crcs = part.get("crc32")
        if crcs is None:
            continue
        with open(path, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(header_len))
            data_start = 8 + header_len
            for name, expected in crcs.items():
                entry = header.get(name)
                if not isinstance(entry, dict):
                    problems.append(f"{path}: tensor {name!r} is missing from the file")
                    continue
                begin, end = entry["data_offsets"]
                try:
                    crc = file_crc32(f.fileno(), data_start + begin, end - begin)
                except EOFError:
                    problems.append(f"{path}: tensor {name!r} is truncated")
                    continue
                if f"{crc:08x}" != expected:
                    problems.append(
                        f"{path}: tensor {name!r} does not match its checksum "
                        f"(CRC-32 {crc:08x}, recorded {expected})"
                    )
    return problems


def check_parts(root: Path, parts: list[Mapping[str, Any]], verify: bool = False) -> list[str]:
    """Every problem of part files against their records: a missing file, its size or header,
    and with `verify` each tensor's CRC-32 (the files are read whole); [] when all is intact."""
    if verify:
        return verify_parts(root, parts)
    problems = []
    for part in parts:
        path = root / part["file"]
        problem = "missing" if not path.is_file() else check_part_header(path, part)
        if problem is not None:
            problems.append(f"{path}: {problem}")
    return problems


def state_status(path: Path, manifest: dict[str, Any], verify: bool = False) -> dict[str, Any]:
    """The status of a state directory from its manifest alone (no torch, no base): method,
    steps, scalars, ledger, and its health: whether every file of the current generation is
    there with its recorded size and header, and with `verify`, whether every tensor matches
    its recorded checksum (the whole state is read, in chunks)."""
    info = summary(manifest)
    if "tensors" in manifest:
        info["tensors"] = manifest["tensors"]
    info["storage"] = storage_summary(manifest)
    generation = manifest["generation"]
    parts = manifest.get("parts")
    problems: list[str] = []
    if generation is not None and parts is None:  # format 1: no checksums, one file per kind
        directory = path / generation_dir_name(generation)
        parts = [{"file": f"{directory.name}/{p.name}"} for p in directory.glob("*.safetensors")]
        if not parts:
            problems.append(f"{directory}: missing (no state files)")
    for part in parts or []:
        file = path / part["file"]
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif not verify:
            problem = check_part_header(file, part)
            if problem is not None:
                problems.append(f"{file}: {problem}")
    if verify and not problems:
        problems = verify_parts(path, parts or [])
    prepared = manifest.get("prepared")
    if isinstance(prepared, dict) and prepared.get("generation") == generation:
        info["prepared"] = {
            "for_step": info["step"] + 1,
            "tensors": prepared.get("tensors"),
            "regime": prepared.get("regime"),
            # Checked as the state's own files are, but apart from them: a damaged preparation
            # is never used (the next add recomputes it), so the merge is not damaged by it.
            "problems": check_parts(path, prepared.get("parts") or [], verify),
        }
    info["health"] = {
        "ok": not problems,
        "problems": problems,
        "verified": verify,
        "checksums": generation is None or manifest.get("parts") is not None,
    }
    return info


def storage_summary(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """How the current generation stores its tensors: bytes of its files, how many tensors are
    factored (and their largest rank) or zero, and whether the state keeps factors at all."""
    forms = read_forms(manifest)
    factored = [f.rank for f in forms.values() if f.kind == FACTORED]
    return {
        "bytes": sum(int(p.get("bytes", 0)) for p in manifest.get("parts") or []),
        "lowrank": keeps_factors(manifest),
        "factored": len(factored),
        "max_rank": max(factored, default=0),
        "zero": sum(f.kind == ZERO for f in forms.values()),
    }


def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": manifest["method"],
        "base": manifest["base"]["path"],
        "step": int(manifest["step"]),
        "scalars": dict(manifest["scalars"]),
        "ledger": [dict(e) for e in manifest["ledger"]],
        "created": manifest["created"],
        "format_version": manifest["format_version"],
        "mergestream_version": manifest["mergestream_version"],
    }


def load_manifest(path: Path) -> dict[str, Any]:
    """The state's manifest as JSON data (not yet checked: see `check_format`)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise StateError(f"{path}: not a merge state (no {MANIFEST}); create one with init")
    try:
        return json.loads(manifest_path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise StateError(f"{manifest_path}: unreadable manifest ({err})") from err


@contextlib.contextmanager
def state_lock(path: Path, exclusive: bool) -> Iterator[None]:
    """flock on the state's lock file: exclusive for a step, shared for readers."""
    lock_path = path / LOCK
    try:
        if not exclusive and lock_path.exists():
            fd = os.open(lock_path, os.O_RDONLY)  # readers need no write access
        else:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        what = "change" if exclusive else "read"
        raise StateError(
            f"{lock_path}: cannot open the state's lock file to {what} the state "
            f"({err.strerror or err}); "
            + (
                "adding to a state needs write access to its directory"
                if exclusive
                else "check the state directory's permissions"
            )
        ) from None
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateError(
                    f"{path}: another mergestream process is "
                    f"{'using' if exclusive else 'adding to'} this state; "
                    "wait for it to finish and try again"
                ) from None
            raise StateError(
                f"{lock_path}: cannot lock the state ({err.strerror or err})"
            ) from None
        yield
    finally:
        os.close(fd)


def read_state_status(path: Path, verify: bool = False) -> dict[str, Any]:
    """`state_status` of the state directory at `path`, read under a shared lock (so a step
    that commits meanwhile cannot make its old files look missing)."""
    with state_lock(path, exclusive=False) if (path / LOCK).exists() else contextlib.nullcontext():
        manifest = load_manifest(path)
        check_format(manifest, path)
        return state_status(path, manifest, verify)


def new_state_id() -> str:
    """A fresh identity for a state being created (recorded as the manifest's `id`)."""
    return uuid.uuid4().hex


def state_identity(manifest: Mapping[str, Any]) -> str:
    """The identity of the state that `manifest` belongs to, the same at every step: the `id`
    drawn at init, or for a state created before states had one, a digest of what init
    recorded (its time, method, precision and the base's content hashes; not the base's path,
    which a user may edit when the base moves), which no later step changes."""
    recorded = manifest.get("id")
    if isinstance(recorded, str) and recorded:
        return recorded
    base = manifest.get("base") or {}
    made = {
        "created": manifest.get("created"),
        "method": (manifest.get("method") or {}).get("name"),
        "state_dtype": manifest.get("state_dtype"),
        "base": [base.get("sha256"), base.get("headers_sha256")],
    }
    return "derived-" + hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:32]


def model_identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What the state's current merged model is made from: the state's identity, its step and
    generation, and a digest of that generation's checksums, scalars and ledger hashes. Two
    manifests with the same identity describe the same merged model."""
    parts = [
        [p.get("file"), p.get("header_sha256"), p.get("crc32")] for p in manifest.get("parts") or []
    ]
    content = {
        "parts": parts,
        "scalars": manifest.get("scalars"),
        "ledger": [e.get("sha256") for e in manifest.get("ledger", [])],
        "method": manifest.get("method"),
    }
    return {
        "state": state_identity(manifest),
        "step": manifest.get("step"),
        "generation": manifest.get("generation"),
        "checksums": hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest(),
    }
