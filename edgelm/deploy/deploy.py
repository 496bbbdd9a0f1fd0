"""Deploy a bundle to a device: copy what changed, make sure the device can run it, verify it there.

Everything lives in one working folder on the device (``--workdir``, default ``~/edgelm``)::

    WORKDIR/bundles/NAME/   the bundle (model file(s), tokenizer.json, edgelm.json)
    WORKDIR/src/edgelm/     edgelm's device side, copied from this machine (pure Python; no converters)
    WORKDIR/venv/           a venv with numpy, tokenizers, jinja2, click and the format's runtime
                            (onnxruntime | ai-edge-litert | executorch + torch), and a .pth naming src/
    WORKDIR/cache/pip/      pip's cache;  WORKDIR/tmp/: TMPDIR for pip and the runtimes

Steps: probe the device (``uname -m``, Python and its version, ``tar``, the emulated-board
marker); check the venv, creating it and pip-installing what is missing when ``install`` is
true, or else failing with an error that names exactly what is missing and the command that
would install it (before anything is copied); copy the files whose size and sha256 differ on
the device; and open the bundle there as the engine does (schema, every file's sha256, the
runtime import), so a bundle that arrived damaged is reported with the device's own message.
:func:`deploy` never writes outside WORKDIR.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgelm.bundle import MANIFEST, Manifest, load_manifest, sha256_file
from edgelm.deploy.transports import (
    DeviceError,
    RemoteCommandError,
    SSHTransport,
    Transport,
    open_transport,
)

__all__ = ["DeployError", "OnDeviceError", "Layout", "DeployResult", "deploy", "verify_on_device", "run_ondevice",
           "runtime_sources", "requirements"]

MIN_PYTHON = (3, 10)
PTH_NAME = "edgelm-device.pth"
DEFAULT_WORKDIR = {"ssh": "~/edgelm", "local": "~/edgelm", "adb": "/data/local/tmp/edgelm"}
DEFAULT_RUNTIME = {"common": ["numpy", "tokenizers", "jinja2"], "pte": ["executorch", "torch"],
                   "onnx": ["onnxruntime"], "tflite": ["ai-edge-litert"]}
ALTERNATIVES = {"ai-edge-litert": ["tflite-runtime"]}  # the LiteRT backend falls back to tflite_runtime
PINNED = {"pte": ("executorch", "torch")}  # a .pte must run on the executorch (and torch) that wrote it

Progress = Callable[[str], None]
SIGNALS = {
    4: " (SIGILL: a native library uses an instruction this CPU does not have; it was built for a newer core)",
    6: " (SIGABRT: a native library aborted)",
    7: " (SIGBUS)",
    9: " (SIGKILL: often the out-of-memory killer; the model may not fit the device's memory)",
    11: " (SIGSEGV: a native library crashed)",
}


class DeployError(DeviceError):
    """The bundle could not be put on the device, or the device cannot run it."""


class OnDeviceError(DeviceError):
    """``edgelm.deploy.ondevice`` reported an error on the device (``kind`` is its exception type)."""

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Layout:
    """Where things live in the device's working folder (an absolute device path)."""

    workdir: str

    @property
    def venv(self) -> str:
        return posixpath.join(self.workdir, "venv")

    @property
    def python(self) -> str:
        return posixpath.join(self.workdir, "venv", "bin", "python")

    @property
    def src(self) -> str:
        return posixpath.join(self.workdir, "src")

    def bundle(self, name: str) -> str:
        return posixpath.join(self.workdir, "bundles", name)


@dataclass
class DeployResult:
    device: str
    machine: str
    workdir: str
    bundle: str  # the bundle folder on the device
    python: str  # the venv's python on the device
    format: str
    sent: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    runtime_files_sent: int = 0  # edgelm's own source files sent (0 when unchanged)
    installed: list[str] = field(default_factory=list)
    emulated: bool = False
    check: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- scripts run on the device

_PY_PROBE = """\
import sys
print("pyver=%d.%d.%d" % sys.version_info[:3])
try:
    import venv, ensurepip
    print("venv=yes")
except Exception:
    print("venv=no")
"""

# argv: root, JSON {relative path: expected size}; prints JSON {relative path: sha256} of the
# files that exist with that size.
_PY_HASH = """\
import hashlib, json, os, sys
root, want = sys.argv[1], json.loads(sys.argv[2])
out = {}
for rel, size in want.items():
    p = os.path.join(root, rel)
    try:
        if os.path.getsize(p) != size:
            continue
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        out[rel] = h.hexdigest()
    except OSError:
        pass
print(json.dumps(out))
"""

# Run by the venv's python. argv: JSON {"requirements": [[install, [[dist, op, version], ...]], ...],
# "src": path, "write_pth": bool}. Prints JSON {"missing": [spec, ...], "have": {dist: version}, "pth": bool}.
_PY_ENV = """\
import json, os, re, sys, sysconfig
from importlib import metadata
args = json.loads(sys.argv[1])
def rel(v):
    out = []
    for x in v.split("+")[0].split("."):
        m = re.match(r"\\d+", x)
        if not m:
            break
        out.append(int(m.group()))
        if m.group() != x:
            break
    return tuple(out)
def ok(have, op, want):
    if not op:
        return True
    h, w = rel(have), rel(want)
    return h[:len(w)] == w if op == "==" else h >= w
missing, have = [], {}
for spec, alts in args["requirements"]:
    good = False
    for dist, op, want in alts:
        try:
            v = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        have[dist] = v
        if ok(v, op, want):
            good = True
            break
    if not good:
        missing.append(spec)
pth = os.path.join(sysconfig.get_paths()["purelib"], "PTH_NAME")
line = args["src"] + "\\n"
present = os.path.isfile(pth) and open(pth).read() == line
if not present and args.get("write_pth"):
    with open(pth, "w") as f:
        f.write(line)
    present = True
print(json.dumps({"missing": missing, "have": have, "pth": present, "python": sys.version.split()[0]}))
""".replace("PTH_NAME", PTH_NAME)


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed((text or "").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _tail(text: str, n: int = 8) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) if lines else "no output"


# --------------------------------------------------------------------------- what goes to the device


def runtime_sources() -> list[tuple[Path, str]]:
    """edgelm's device side as (local file, path under src/): ``edgelm/`` without ``converters/``,
    plus ``edgelm.targets`` (stdlib-only profiles) so ``edgelm targets`` works there too."""
    import edgelm

    out: list[tuple[Path, str]] = []
    pkg = Path(edgelm.__file__).resolve().parent
    for f in sorted(pkg.rglob("*.py")):
        rel = f.relative_to(pkg)
        if rel.parts[0] in ("converters", "targets") or "__pycache__" in rel.parts:
            continue
        out.append((f, posixpath.join("edgelm", *rel.parts)))
    try:
        import edgelm.targets as targets

        tdir = Path(targets.__file__).resolve().parent
        for f in sorted([*tdir.glob("*.py"), *tdir.glob("*.toml")]):
            out.append((f, f"edgelm/targets/{f.name}"))
    except ImportError:  # pragma: no cover - targets ship with edgelm
        pass
    return out


def requirements(manifest: Manifest, python_version: tuple[int, ...] = (3, 11)) -> list[tuple[str, list]]:
    """(pip spec, alternatives [[dist, op, version], ...]) the device needs for ``manifest``."""
    runtime = dict(DEFAULT_RUNTIME)
    if manifest.target and isinstance(manifest.target.get("runtime"), dict):
        runtime.update({k: v for k, v in manifest.target["runtime"].items() if isinstance(v, list)})
    names = [*runtime["common"], "click", *runtime.get(manifest.format, DEFAULT_RUNTIME.get(manifest.format, []))]
    if python_version < (3, 11):
        names.append("tomli")
    out, seen = [], set()
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        op = ver = ""
        if name in PINNED.get(manifest.format, ()) and manifest.versions.get(name):
            op, ver = "==", manifest.versions[name].split("+")[0]
        alts = [[name, op, ver], *([alt, op, ver] for alt in ALTERNATIVES.get(name, []))]
        out.append((f"{name}{op}{ver}", alts))
    return out


def _bundle_files(root: Path, manifest: Manifest) -> dict[str, Path]:
    files = {name: root / name for name in manifest.files}
    files[MANIFEST] = root / MANIFEST
    return files


def _check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or any(ord(c) < 32 for c in name):
        raise DeployError(f"bad bundle name {name!r} for the device: give a plain folder name")
    return name


# --------------------------------------------------------------------------- steps


def _probe(t: Transport, python: str) -> dict[str, str]:
    qpy = shlex.quote(python)
    script = (
        'printf "home=%s\\n" "$HOME"; printf "arch=%s\\n" "$(uname -m)"; '
        f"if command -v {qpy} >/dev/null 2>&1; then printf 'python=%s\\n' \"$(command -v {qpy})\"; "
        f"{qpy} -c {shlex.quote(_PY_PROBE)}; fi; "
        "command -v tar >/dev/null 2>&1 && echo tar=yes; "
        "[ -f /etc/edgelm-emulated ] && echo emulated=marker; "
        '[ -n "${EDGELM_EMULATED:-}" ] && echo emulated=env; true'
    )
    out: dict[str, str] = {}
    for line in t.shell(script, what="probing the device", timeout=120).stdout.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out.setdefault(k.strip(), v.strip())
    return out


def _check_python(probe: dict[str, str], python: str, t: Transport) -> tuple[int, ...]:
    if "python" not in probe:
        raise DeployError(
            f"no Python on {t}: {python!r} is not found in the device's PATH; install Python 3.10+ there "
            "(Debian / Raspberry Pi OS: sudo apt install python3 python3-venv) or name it with --python PATH")
    if "pyver" not in probe:
        raise DeployError(f"{probe['python']} on {t} does not run; check the Python installation there")
    version = tuple(int(x) for x in probe["pyver"].split("."))
    if version < MIN_PYTHON:
        raise DeployError(f"{probe['python']} on {t} is Python {probe['pyver']}; edgelm needs "
                          f"{'.'.join(map(str, MIN_PYTHON))}+ (name another interpreter with --python)")
    return version


def _remote_hashes(t: Transport, root: str, python: str, sizes: dict[str, int]) -> dict[str, str]:
    proc = t.run([python, "-c", _PY_HASH, root, json.dumps(sizes)], what="hashing files on the device",
                 check=False)
    data = _last_json(proc.stdout)
    if proc.returncode != 0 or data is None:
        raise DeployError(f"could not hash the files on {t}: {_tail(proc.stderr or proc.stdout)}")
    return data


def _sync(t: Transport, local: dict[str, Path], remote_root: str, python: str,
          progress: Progress | None) -> tuple[list[str], list[str], int]:
    """Send the files of ``local`` (relative name -> path) whose sha256 differs on the device."""
    sizes = {name: p.stat().st_size for name, p in local.items()}
    have = _remote_hashes(t, remote_root, python, sizes)
    send = [name for name, p in local.items() if have.get(name) != sha256_file(p)]
    skipped = [name for name in local if name not in send]
    nbytes = sum(sizes[n] for n in send)
    if send:
        if progress:
            progress(f"sending {len(send)} file(s), {nbytes / 1e6:.1f} MB, to {remote_root}"
                     + (f" ({len(skipped)} already there)" if skipped else ""))
        t.push([(local[n], n) for n in send], remote_root, progress)
    elif progress:
        progress(f"{remote_root}: all {len(skipped)} file(s) already there")
    return send, skipped, nbytes


def _env_state(t: Transport, layout: Layout, reqs: list, write_pth: bool) -> dict[str, Any] | None:
    """What the venv has (None if there is no working venv)."""
    args = {"requirements": reqs, "src": layout.src, "write_pth": write_pth}
    script = (f"[ -x {shlex.quote(layout.python)} ] && "
              + Transport.script([layout.python, "-c", _PY_ENV, json.dumps(args)]))
    proc = t.shell(script, check=False, what="checking the device's Python environment", timeout=300)
    return _last_json(proc.stdout) if proc.returncode == 0 else None


def _make_venv(t: Transport, layout: Layout, python: str, probe: dict[str, str], system_site_packages: bool,
               progress: Progress | None) -> None:
    if probe.get("venv") != "yes":
        raise DeployError(
            f"{probe['python']} on {t} cannot make a venv (the venv/ensurepip modules are missing); install "
            "them there (Debian / Raspberry Pi OS: sudo apt install python3-venv) and deploy again")
    if progress:
        progress(f"creating a venv at {layout.venv}")
    argv = [python, "-m", "venv", *(["--system-site-packages"] if system_site_packages else []), layout.venv]
    t.run(argv, what="creating the venv", timeout=600)


def _pip_install(t: Transport, layout: Layout, probe: dict[str, str], specs: list[str],
                 pip_args: Sequence[str], progress: Progress | None) -> None:
    if progress:
        progress(f"installing on the device: {' '.join(specs)}")
    # pip's cache and temporary files stay in the workdir too (and off a small tmpfs /tmp)
    cache, tmp = posixpath.join(layout.workdir, "cache", "pip"), posixpath.join(layout.workdir, "tmp")
    argv = [layout.python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
            "--progress-bar", "off", *pip_args, *specs]
    script = f"mkdir -p {shlex.quote(cache)} {shlex.quote(tmp)} && " + Transport.script(
        argv, env={"PIP_CACHE_DIR": cache, "TMPDIR": tmp})
    proc = t.shell(script, check=False, what="pip install",
                   stream=(lambda line: progress("  " + line)) if progress else None)
    if proc.returncode != 0:
        raise DeployError(
            f"installing {' '.join(specs)} on {t} failed: {_tail(proc.stdout + proc.stderr, 4)}; "
            f"the device's Python {probe.get('pyver')} on {probe.get('arch')} may have no wheel for one of "
            "them, or the device has no access to the package index")


def run_ondevice(t: Transport, layout: Layout, command: str, args: dict[str, Any], *,
                 timeout: float | None = None, python: str | None = None) -> dict[str, Any]:
    """Run ``python -m edgelm.deploy.ondevice COMMAND ARGS`` in the device's workdir; its JSON result."""
    tmp = posixpath.join(layout.workdir, "tmp")  # runtimes' scratch files (torch's caches) stay in the workdir
    script = Transport.script([python or layout.python, "-m", "edgelm.deploy.ondevice", command, json.dumps(args)],
                              cwd=layout.workdir, env={"PYTHONPATH": layout.src, "TMPDIR": tmp})
    # the shell stays around (the command is not the last one), so a crash comes back as 128+signal
    script = (f'mkdir -p {shlex.quote(tmp)} && {script}; rc=$?; '
              '[ "$rc" -gt 128 ] && echo "edgelm: signal $((rc - 128))" >&2; exit "$rc"')
    proc = t.shell(script, check=False, timeout=timeout, what=f"edgelm {command}")
    data = _last_json(proc.stdout)
    if data is None:
        sig = re.search(r"edgelm: signal (\d+)", proc.stderr or "")
        why = ""
        if sig:
            n = int(sig.group(1))
            why = f"; the process was killed by signal {n}" + SIGNALS.get(n, "")
        raise RemoteCommandError(f"edgelm {command} on {t} failed (exit {proc.returncode}): "
                                 f"{_tail(proc.stderr or proc.stdout)}{why}", proc)
    if "error" in data:
        raise OnDeviceError(f"on {t}: {data['error']}", data.get("type", ""))
    return data


def verify_on_device(t: Transport, layout: Layout, remote_bundle: str, threads: int | None = None,
                     python: str | None = None) -> dict[str, Any]:
    """Open the deployed bundle on the device as the engine does: schema, every sha256, runtime import."""
    try:
        return run_ondevice(t, layout, "check", {"bundle": remote_bundle, "threads": threads}, python=python)
    except OnDeviceError as e:
        if e.kind == "BundleError":
            raise DeployError(f"the bundle failed its check on the device: {e}; deploy it again (the damaged file "
                              "is sent again) or convert it again") from e
        raise DeployError(f"the device cannot open the bundle: {e}") from e
    except RemoteCommandError as e:
        raise DeployError(f"the device cannot open the bundle: {e}") from e


def deploy(bundle: str | Path, url: str, workdir: str | None = None, install: bool = True, *,
           ssh_config: str | Path | None = None, python: str | None = None, connect_timeout: float = 10,
           system_site_packages: bool = False, pip_args: Sequence[str] = (), name: str | None = None,
           progress: Progress | None = None, transport: Transport | None = None) -> DeployResult:
    """Put ``bundle`` on the device at ``url`` (see the module doc) and check it runs there.

    ``workdir`` and ``python`` default to the bundle's target profile ([deploy]) when it names
    the same transport, else ``~/edgelm`` (``/data/local/tmp/edgelm`` over adb) and ``python3``.
    ``pip_args`` go to the device's ``pip install`` (e.g. ``--extra-index-url URL``; for a .pte
    on aarch64 Linux, PyPI's torch is a CUDA build, see the README).
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    root, manifest = load_manifest(bundle, verify=True)  # a bundle damaged here is the host's problem
    name = _check_name(name or (Path(bundle).stem if Path(bundle).is_file() else Path(bundle).resolve().name))
    t = transport or open_transport(url, ssh_config=ssh_config, connect_timeout=connect_timeout)
    profile = (manifest.target or {}).get("deploy") or {}
    same = profile.get("transport") == t.url.scheme
    python = python or (profile.get("python") if same else None) or "python3"
    workdir = workdir or (profile.get("workdir") if same else None) or DEFAULT_WORKDIR[t.url.scheme]

    probe = _probe(t, python)
    if isinstance(t, SSHTransport):
        t._has_tar = probe.get("tar") == "yes"
    if probe.get("home", "").startswith("/"):
        t._home = probe["home"]
    py_version = _check_python(probe, python, t)
    layout = Layout(t.resolve(workdir))
    if layout.workdir in ("/", t.home().rstrip("/") or "/"):
        raise DeployError(f"workdir {layout.workdir} is not a folder of its own; give one such as ~/edgelm "
                          "(edgelm writes bundles/, src/ and venv/ into it)")
    timings["probe_s"] = time.perf_counter() - t0
    if progress:
        progress(f"{t}: {probe.get('arch')}, Python {probe.get('pyver')}, workdir {layout.workdir}"
                 + (" (emulated board)" if "emulated" in probe else ""))

    # 1. the Python environment first: a device that cannot run the bundle gets nothing copied
    t2 = time.perf_counter()
    reqs = requirements(manifest, py_version)
    state = _env_state(t, layout, reqs, write_pth=True)
    installed: list[str] = []
    if state is None or state["missing"]:
        specs = [spec for spec, _ in reqs] if state is None else state["missing"]
        if not install:
            what = (f"no working venv at {layout.venv}" if state is None
                    else f"missing in {layout.venv}: {', '.join(specs)}")
            fix = (f"{shlex.quote(python)} -m venv {shlex.quote(layout.venv)} && " if state is None else "") + \
                f"{shlex.quote(layout.python)} -m pip install {' '.join(shlex.quote(s) for s in specs)}"
            raise DeployError(f"{t} cannot run this {manifest.format} bundle yet: {what}. Deploy with --install, "
                              f"or run this on the device: {fix}")
        if state is None:  # make the venv first: with system site packages it may already have everything
            _make_venv(t, layout, python, probe, system_site_packages, progress)
            state = _env_state(t, layout, reqs, write_pth=True)
            specs = state["missing"] if state is not None else specs
        if specs:
            _pip_install(t, layout, probe, specs, pip_args, progress)
            installed = specs
            state = _env_state(t, layout, reqs, write_pth=True)
        if state is None or state["missing"]:
            raise DeployError(f"after installing, {layout.venv} on {t} still lacks "
                              f"{', '.join(state['missing']) if state else 'a working python'}")
    timings["install_s"] = time.perf_counter() - t2

    # 2. copy edgelm's device side and the bundle (files already there are skipped)
    t1 = time.perf_counter()
    remote_bundle = layout.bundle(name)
    prefix = posixpath.relpath(remote_bundle, layout.workdir) + "/"
    files = {posixpath.join("src", rel): p for p, rel in runtime_sources()}
    files.update({prefix + f: p for f, p in _bundle_files(root, manifest).items()})
    sent_all, skipped_all, nbytes = _sync(t, files, layout.workdir, python, progress)
    sent = [f[len(prefix):] for f in sent_all if f.startswith(prefix)]
    skipped = [f[len(prefix):] for f in skipped_all if f.startswith(prefix)]
    sent_src = [f for f in sent_all if not f.startswith(prefix)]
    timings["copy_s"] = time.perf_counter() - t1

    # 3. verify there
    t3 = time.perf_counter()
    check = verify_on_device(t, layout, remote_bundle)
    timings["verify_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t0
    if progress:
        progress(f"deployed {name} to {t}:{remote_bundle} ({manifest.format}; {len(sent)} sent, "
                 f"{len(skipped)} unchanged; checksums ok on the device)")
    return DeployResult(
        device=str(t), machine=probe.get("arch", "?"), workdir=layout.workdir, bundle=remote_bundle,
        python=layout.python, format=manifest.format, sent=sent, skipped=skipped, bytes_sent=nbytes,
        runtime_files_sent=len(sent_src), installed=installed, emulated="emulated" in probe, check=check,
        timings=timings,
    )
