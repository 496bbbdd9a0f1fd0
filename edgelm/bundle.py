"""The bundle: the contract between host and device.

A bundle is a folder (or a ``.zip`` of one) holding the model file, ``tokenizer.json``
and ``edgelm.json``. The manifest records the schema version, format, scheme, model
config, tokenizer facts, chat template, ``max_context``, verification numbers and the
sha256 of every other file. :func:`load_manifest` refuses a bundle whose schema or
checksums do not match, naming the file; :class:`BundleWriter` builds a bundle in a
temporary folder and renames it into place only when it is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm.config import ModelConfig
from edgelm.errors import BundleError

MANIFEST = "edgelm.json"
SCHEMA_VERSION = 1
_CHUNK = 1 << 22


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Manifest:
    """Contents of ``edgelm.json``."""

    format: str
    model_file: str
    model: ModelConfig
    scheme: str = "fp32"
    tokenizer_file: str = "tokenizer.json"
    special_tokens: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    max_context: int = 2048
    io: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] | None = None
    verification: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "format": self.format,
            "scheme": self.scheme,
            "model_file": self.model_file,
            "tokenizer_file": self.tokenizer_file,
            "max_context": self.max_context,
            "model": self.model.to_dict(),
            "special_tokens": self.special_tokens,
            "chat_template": self.chat_template,
            "io": self.io,
            "target": self.target,
            "verification": self.verification,
            "source": self.source,
            "versions": self.versions,
            "files": self.files,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MANIFEST) -> Manifest:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{where}: schema_version {version!r} is not supported by this edgelm "
                f"(it reads version {SCHEMA_VERSION}); convert the model again with this edgelm "
                "or install the edgelm version that wrote it"
            )
        try:
            return cls(
                format=data["format"],
                model_file=data["model_file"],
                model=ModelConfig.from_dict(data["model"]),
                scheme=data.get("scheme", "fp32"),
                tokenizer_file=data.get("tokenizer_file", "tokenizer.json"),
                special_tokens=data.get("special_tokens", {}),
                chat_template=data.get("chat_template"),
                max_context=int(data["max_context"]),
                io=data.get("io", {}),
                target=data.get("target"),
                verification=data.get("verification", {}),
                source=data.get("source", {}),
                versions=data.get("versions", {}),
                files=data["files"],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{where}: malformed manifest ({e}); the bundle is damaged, convert it again") from e


def _extract_zip(path: Path) -> Path:
    """Extract a zipped bundle to a private temporary folder and return the bundle root."""
    out = Path(tempfile.mkdtemp(prefix="edgelm-bundle-"))
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                target = (out / name).resolve()
                if not str(target).startswith(str(out.resolve())):
                    raise BundleError(f"{path}: zip member {name!r} points outside the bundle; refusing it")
            zf.extractall(out)
    except zipfile.BadZipFile as e:
        shutil.rmtree(out, ignore_errors=True)
        raise BundleError(f"{path}: not a valid zip file ({e})") from e
    hits = list(out.rglob(MANIFEST))
    if len(hits) != 1:
        raise BundleError(f"{path}: expected one {MANIFEST} in the zip, found {len(hits)}")
    return hits[0].parent


def resolve_bundle(path: str | os.PathLike[str]) -> Path:
    """The bundle folder for ``path`` (a folder, or a ``.zip`` which is extracted)."""
    p = Path(path)
    if not p.exists():
        raise BundleError(f"bundle {p} does not exist; create one with `edgelm convert ... -o {p}`")
    if p.is_file() and zipfile.is_zipfile(p):
        return _extract_zip(p)
    if not p.is_dir():
        raise BundleError(f"{p} is neither a bundle folder nor a zipped bundle")
    if not (p / MANIFEST).is_file():
        raise BundleError(f"{p} is not an edgelm bundle: {MANIFEST} is missing")
    return p


def load_manifest(path: str | os.PathLike[str], verify: bool = True) -> tuple[Path, Manifest]:
    """Open a bundle, check its schema and (by default) every file's sha256.

    Returns the bundle folder and its manifest. Raises :class:`BundleError` naming the
    first file that is missing or changed.
    """
    root = resolve_bundle(path)
    try:
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{root / MANIFEST}: cannot read manifest ({e})") from e
    if not isinstance(data, dict):
        raise BundleError(f"{root / MANIFEST}: manifest is not a JSON object")
    manifest = Manifest.from_dict(data, where=str(root / MANIFEST))
    for name in (manifest.model_file, manifest.tokenizer_file):
        if name not in manifest.files:
            raise BundleError(f"{root / MANIFEST}: {name} is not listed in 'files'; the manifest is damaged")
    if verify:
        verify_files(root, manifest)
    return root, manifest


def verify_files(root: Path, manifest: Manifest) -> None:
    """Check that every file listed in the manifest exists with the recorded size and sha256."""
    for name, info in manifest.files.items():
        f = root / name
        if not f.is_file():
            raise BundleError(f"{f}: listed in the manifest but missing; copy the whole bundle again")
        if f.stat().st_size != info.get("size"):
            raise BundleError(
                f"{f}: size {f.stat().st_size} does not match the manifest ({info.get('size')}); "
                "the file was changed or truncated, copy or convert the bundle again"
            )
        if sha256_file(f) != info.get("sha256"):
            raise BundleError(
                f"{f}: sha256 does not match the manifest; the file was changed or corrupted, "
                "copy or convert the bundle again"
            )


class BundleWriter:
    """Builds a bundle in a temporary folder beside ``out``; :meth:`commit` moves it into place.

    Use as a context manager: leaving the block with an exception removes the
    temporary folder, so nothing half-written is ever found at ``out``.
    """

    def __init__(self, out: str | os.PathLike[str], overwrite: bool = False) -> None:
        self.out = Path(out).absolute()
        if self.out.exists() and not overwrite:
            raise BundleError(f"{self.out} already exists; choose another output path or pass --force")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.overwrite = overwrite
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))

    def path(self, name: str) -> Path:
        """Where to write bundle file ``name`` before commit."""
        return self.tmp / name

    def write_manifest(self, manifest: Manifest) -> Path:
        """Hash every file and write ``edgelm.json`` into the temporary folder (still not at ``out``).

        Returns the temporary folder, which is then a complete bundle that can be verified.
        """
        manifest.files = {
            p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(self.tmp.iterdir())
            if p.is_file() and p.name != MANIFEST
        }
        for name in (manifest.model_file, manifest.tokenizer_file):
            if name not in manifest.files:
                raise BundleError(f"internal error: bundle file {name} was never written")
        tmp_manifest = self.tmp / MANIFEST
        tmp_manifest.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
        return self.tmp

    def commit(self, manifest: Manifest | None = None) -> Path:
        """(Optionally write ``manifest``, then) rename the finished folder to ``out``."""
        if manifest is not None:
            self.write_manifest(manifest)
        if not (self.tmp / MANIFEST).is_file():
            raise BundleError("internal error: commit() before the manifest was written")
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():
            self.abort()
