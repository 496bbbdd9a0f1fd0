"""Bundle writing is atomic; loading refuses changed, missing or foreign files."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest

from edgelm.bundle import MANIFEST, BundleWriter, Manifest, load_manifest
from edgelm.converters.sources import tiny_config
from edgelm.errors import BundleError


def _write(out, overwrite=False, content=b"model-bytes"):
    with BundleWriter(out, overwrite=overwrite) as w:
        w.path("model.bin").write_bytes(content)
        w.path("tokenizer.json").write_text("{}")
        return w.commit(Manifest(format="pte", model_file="model.bin", model=tiny_config(), max_context=128))


def test_roundtrip_and_checksums(tmp_path):
    out = _write(tmp_path / "b")
    root, m = load_manifest(out)
    assert m.files["model.bin"]["size"] == len(b"model-bytes")
    assert m.model == tiny_config()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_build_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with BundleWriter(tmp_path / "b") as w:
            w.path("model.bin").write_bytes(b"half")
            raise RuntimeError("lowering crashed")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_without_force(tmp_path):
    _write(tmp_path / "b")
    with pytest.raises(BundleError, match="already exists"):
        _write(tmp_path / "b")
    out = _write(tmp_path / "b", overwrite=True, content=b"new")
    assert load_manifest(out)[1].files["model.bin"]["size"] == 3


def test_changed_file_is_named(tmp_path):
    out = _write(tmp_path / "b")
    (out / "model.bin").write_bytes(b"model-bytez")
    with pytest.raises(BundleError, match="model.bin.*sha256"):
        load_manifest(out)
    (out / "model.bin").write_bytes(b"short")
    with pytest.raises(BundleError, match="model.bin.*size"):
        load_manifest(out)
    (out / "model.bin").unlink()
    with pytest.raises(BundleError, match="model.bin.*missing"):
        load_manifest(out)
    assert load_manifest(out, verify=False)[1].format == "pte"


def test_schema_and_shape_errors(tmp_path):
    out = _write(tmp_path / "b")
    data = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(BundleError, match="schema_version"):
        load_manifest(out)
    (out / MANIFEST).write_text("not json")
    with pytest.raises(BundleError, match="cannot read manifest"):
        load_manifest(out)
    with pytest.raises(BundleError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(BundleError, match="not an edgelm bundle"):
        load_manifest(tmp_path / "plain")


def test_zip_bundle(tmp_path):
    out = _write(tmp_path / "b")
    archive = shutil.make_archive(str(tmp_path / "b"), "zip", root_dir=tmp_path, base_dir="b")
    root, m = load_manifest(archive)
    assert (root / "model.bin").read_bytes() == b"model-bytes"
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.txt", "x")
        zf.write(out / MANIFEST, MANIFEST)
    with pytest.raises(BundleError, match="outside"):
        load_manifest(evil)
