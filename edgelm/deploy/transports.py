"""Transports: how edgelm reaches a device. Thin wrappers over standard tools, torch-free.

A device is named by a URL:

- ``local``: this machine (the working folder is a local folder);
- ``ssh://[user@]host[:port]``, or a bare ``host`` / ``user@host`` that may be a ``Host`` alias
  from ``~/.ssh/config``: the system OpenSSH client, so ssh config, agents, jump hosts and
  ``known_hosts`` all apply. It runs with ``BatchMode=yes`` (it never prompts; a password is
  never asked for, passed or logged) and a ``ConnectTimeout`` so an unreachable device fails
  fast. ``ssh_config`` passes a private config file with ``-F``;
- ``adb://SERIAL`` (or ``adb://`` for the only attached device): the ``adb`` binary.

Every command is an argv list run without a local shell. What runs on the device is one
POSIX ``sh`` command line in which every path is quoted with :func:`shlex.quote`. Files go to
the device as a tar stream over ssh (no scp/sftp needed, so dropbear boards work too; a
per-file ``cat`` when the device has no ``tar``) or with ``adb push``. URL parts are checked
against strict patterns before anything runs, so shell metacharacters or an option-looking
host (``-oProxyCommand=...``) are a :class:`DeviceURLError`, never a command.
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgelm.errors import EdgeLMError

__all__ = [
    "DeviceError", "DeviceURLError", "DeviceUnreachableError", "RemoteCommandError", "DeviceURL",
    "parse_device_url", "Transport", "LocalTransport", "SSHTransport", "AdbTransport", "open_transport",
    "quote_env",
]

DEFAULT_CONNECT_TIMEOUT = 10  # seconds; ssh ConnectTimeout (TCP connect and the banner exchange)


class DeviceError(EdgeLMError):
    """A device cannot be reached, lacks something, or a command failed there."""


class DeviceURLError(DeviceError):
    """A device URL is malformed or unsafe."""


class DeviceUnreachableError(DeviceError):
    """The transport could not reach the device (network, authentication, adb state)."""


class RemoteCommandError(DeviceError):
    """A command ran on the device and failed."""

    def __init__(self, message: str, result: subprocess.CompletedProcess | None = None) -> None:
        super().__init__(message)
        self.result = result


# --------------------------------------------------------------------------- URLs

_HOST = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,252}[A-Za-z0-9_])?")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_SERIAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_SSH_URL = re.compile(r"ssh://(?:(?P<user>[^@]*)@)?(?P<host>\[[^\]]*\]|[^:/\[\]]*)(?::(?P<port>[^/]*))?(?P<path>/.*)?",
                      re.S)
EXAMPLES = "ssh://pi@raspberrypi.local, ssh://user@192.168.1.20:2222, a Host alias from ~/.ssh/config, " \
           "adb://SERIAL (see `adb devices`) or local"


def _redact(url: str) -> str:
    return re.sub(r"(//[^:@/]*):[^@]*@", r"\1:***@", url)


def _bad_chars(s: str, allowed: str = "A-Za-z0-9._-") -> str:
    bad = sorted(set(re.sub(f"[{allowed}]", "", s)))
    return " ".join(repr(c) for c in bad)


@dataclass(frozen=True)
class DeviceURL:
    """A parsed, validated device URL."""

    scheme: str  # "local" | "ssh" | "adb"
    host: str | None = None  # ssh: a host name, an address or a Host alias (IPv6 without brackets)
    user: str | None = None
    port: int | None = None
    serial: str | None = None  # adb; None: the only attached device

    def __str__(self) -> str:
        if self.scheme == "local":
            return "local"
        if self.scheme == "adb":
            return f"adb://{self.serial or ''}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"ssh://{self.user + '@' if self.user else ''}{host}{f':{self.port}' if self.port else ''}"


def _check_host(url: str, host: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        if not _IPV6.fullmatch(inner):
            raise DeviceURLError(f"device URL {url!r}: {host!r} is not an IPv6 address")
        return inner
    if not host:
        raise DeviceURLError(f"device URL {url!r} names no host; examples: {EXAMPLES}")
    if host.startswith("-"):
        raise DeviceURLError(f"device URL {url!r}: a host may not start with '-' (it would read as an ssh option)")
    if not _HOST.fullmatch(host):
        raise DeviceURLError(
            f"device URL {url!r}: the host {host!r} contains characters a host name cannot have "
            f"({_bad_chars(host)}); use a host name, an address or an ssh Host alias (letters, digits, '.', '-', "
            f"'_'); examples: {EXAMPLES}")
    return host


def _check_user(url: str, user: str) -> str:
    if ":" in user:
        raise DeviceURLError(f"device URL {_redact(url)!r} carries a password: edgelm never passes passwords "
                             "(ssh runs with BatchMode=yes); set up key authentication instead (ssh-copy-id)")
    if not _USER.fullmatch(user):
        raise DeviceURLError(
            f"device URL {url!r}: the user name {user!r} is not allowed"
            + (f" (it contains {_bad_chars(user)})" if _bad_chars(user) else "")
            + "; use letters, digits, '.', '-', '_' (not starting with '-' or '.')")
    return user


def parse_device_url(url: str | DeviceURL) -> DeviceURL:
    """Parse and validate ``url`` (see the module doc). Raises :class:`DeviceURLError`."""
    if isinstance(url, DeviceURL):
        return url
    if not isinstance(url, str) or not url:
        raise DeviceURLError(f"no device given; examples: {EXAMPLES}")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise DeviceURLError(f"device URL {url!r} contains whitespace or control characters; examples: {EXAMPLES}")
    if url in ("local", "local:", "local://"):
        return DeviceURL("local")
    if url == "adb" or url.startswith("adb://"):
        serial = url[len("adb://"):] if url.startswith("adb://") else ""
        if serial and not _SERIAL.fullmatch(serial):
            raise DeviceURLError(
                f"device URL {url!r}: the adb serial {serial!r} is not allowed"
                + (f" (it contains {_bad_chars(serial, 'A-Za-z0-9._:-')})" if _bad_chars(serial, "A-Za-z0-9._:-")
                   else "") + "; use the serial `adb devices` prints, e.g. adb://emulator-5554 or "
                "adb://192.168.1.30:5555")
        return DeviceURL("adb", serial=serial or None)
    if url.startswith("ssh://"):
        m = _SSH_URL.fullmatch(url)
        if not m:
            raise DeviceURLError(f"device URL {url!r} is not of the form ssh://[user@]host[:port]; "
                                 f"examples: {EXAMPLES}")
        if m["path"] and m["path"] != "/":
            raise DeviceURLError(f"device URL {url!r}: a device URL has no path; give the folder with --workdir")
        user = _check_user(url, m["user"]) if m["user"] is not None else None
        host = _check_host(url, m["host"])
        port = None
        if m["port"] is not None:
            if not m["port"].isdigit() or not 0 < int(m["port"]) < 65536:
                raise DeviceURLError(f"device URL {url!r}: port {m['port']!r} is not a number from 1 to 65535")
            port = int(m["port"])
        return DeviceURL("ssh", host=host, user=user, port=port)
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise DeviceURLError(f"device URL {url!r}: unknown transport {scheme!r}; use ssh://, adb:// or local "
                             "(an emulated arm64 board is reached over ssh: see device_tests/emulated_board.sh)")
    # a bare ssh destination: host alias or user@host
    user, _, host = url.rpartition("@")
    if ":" in host and not host.startswith("["):
        raise DeviceURLError(f"device URL {url!r}: write a port as ssh://{url} "
                             "(a bare name is taken as an ssh host or Host alias)")
    return DeviceURL("ssh", host=_check_host(url, host), user=_check_user(url, user) if user else None)


def quote_env(env: dict[str, str] | None) -> str:
    """``K=V`` assignments for a sh command line (values quoted, names checked)."""
    out = []
    for k, v in (env or {}).items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise ValueError(f"bad environment variable name {k!r}")
        out.append(f"{k}={shlex.quote(str(v))}")
    return " ".join(out)


# --------------------------------------------------------------------------- transports

Progress = Callable[[str], None]


class Transport:
    """Runs sh command lines on a device and copies files into its folders.

    Subclasses build the argv (:meth:`command`) and copy files (:meth:`push`); the rest is shared.
    """

    tool = ""  # the host binary the transport drives

    def __init__(self, url: DeviceURL) -> None:
        self.url = url
        self._home: str | None = None

    # -- what subclasses provide -------------------------------------------------
    def command(self, script: str) -> list[str]:
        """The host argv that runs ``script`` (one sh command line) on the device."""
        raise NotImplementedError

    def push(self, files: Sequence[tuple[Path, str]], remote_dir: str, progress: Progress | None = None) -> None:
        """Copy local files to ``remote_dir/NAME`` (NAME relative, may contain '/'); folders are made."""
        raise NotImplementedError

    def _connection_error(self, proc: subprocess.CompletedProcess) -> str | None:
        """A message when ``proc`` failed because the device could not be reached, else None."""
        return None

    # -- shared ------------------------------------------------------------------
    def __str__(self) -> str:
        return str(self.url)

    def close(self) -> None:
        """Release connections (nothing to do for the plain transports)."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _spawn_error(self, e: OSError) -> DeviceError:
        return DeviceError(f"cannot run {self.tool!r} on this machine ({e}); install it (Debian/Ubuntu: "
                           f"apt-get install {'openssh-client' if self.tool == 'ssh' else self.tool})")

    def shell(self, script: str, *, check: bool = True, timeout: float | None = None, input: str | None = None,
              what: str | None = None, stream: Progress | None = None) -> subprocess.CompletedProcess:
        """Run ``script`` (an sh command line, already quoted) on the device.

        Raises :class:`DeviceUnreachableError` when the device cannot be reached and, with
        ``check``, :class:`RemoteCommandError` when the command exits non-zero. ``stream`` gets
        every output line as it arrives (stdout and stderr merged) for long commands.
        """
        argv = self.command(script)
        try:
            if stream is None:
                proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                                      stdin=subprocess.DEVNULL if input is None else None,
                                      errors="replace")
            else:
                proc = self._run_streaming(argv, timeout, stream)
        except FileNotFoundError as e:
            raise self._spawn_error(e) from e
        except subprocess.TimeoutExpired as e:
            raise DeviceError(f"{what or 'a command'} on {self} did not finish within {timeout:.0f} s") from e
        msg = self._connection_error(proc)
        if msg:
            raise DeviceUnreachableError(msg)
        if check and proc.returncode != 0:
            raise RemoteCommandError(f"{what or 'a command'} failed on {self} (exit {proc.returncode}): "
                                     f"{_tail(proc.stderr or proc.stdout)}", proc)
        return proc

    @staticmethod
    def _run_streaming(argv: list[str], timeout: float | None, stream: Progress) -> subprocess.CompletedProcess:
        lines: list[str] = []
        with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace") as p:
            assert p.stdout is not None
            for line in p.stdout:
                lines.append(line)
                stream(line.rstrip("\n"))
            rc = p.wait(timeout=timeout)
        out = "".join(lines)
        return subprocess.CompletedProcess(argv, rc, out, out)

    def run(self, argv: Sequence[str], *, cwd: str | None = None, env: dict[str, str] | None = None,
            **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` on the device (each word quoted), optionally in ``cwd`` with ``env`` set."""
        return self.shell(self.script(argv, cwd=cwd, env=env), **kwargs)

    @staticmethod
    def script(argv: Sequence[str], *, cwd: str | None = None, env: dict[str, str] | None = None) -> str:
        """The sh command line :meth:`run` sends."""
        cmd = shlex.join(argv)
        if env:
            cmd = f"{quote_env(env)} {cmd}"
        return f"cd {shlex.quote(cwd)} && {cmd}" if cwd else cmd

    def home(self) -> str:
        """The device user's home folder."""
        if self._home is None:
            out = self.shell('printf "%s" "$HOME"', what="reading $HOME").stdout.strip()
            if not out.startswith("/"):
                raise DeviceError(f"{self}: $HOME is {out!r}, not an absolute path; give an absolute --workdir")
            self._home = out
        return self._home

    def resolve(self, path: str) -> str:
        """An absolute device path for ``path`` (``~`` and relative paths are under the device's home)."""
        if not path or "\0" in path or "\n" in path:
            raise DeviceError(f"bad device path {path!r}")
        if path == "~" or path.startswith("~/"):
            path = self.home() + path[1:]
        elif not path.startswith("/"):
            path = posixpath.join(self.home(), path)
        return posixpath.normpath(path)


def _tail(text: str, lines: int = 6) -> str:
    kept = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return " | ".join(kept[-lines:]) if kept else "no output"


class LocalTransport(Transport):
    """This machine: ``sh -c`` and file copies."""

    tool = "sh"

    def __init__(self, url: DeviceURL | None = None) -> None:
        super().__init__(url or DeviceURL("local"))

    def command(self, script: str) -> list[str]:
        return ["sh", "-c", script]

    def home(self) -> str:
        return os.path.expanduser("~")

    def push(self, files: Sequence[tuple[Path, str]], remote_dir: str, progress: Progress | None = None) -> None:
        for local, name in files:
            dst = Path(remote_dir) / _safe_name(name)
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.partial")
            shutil.copyfile(local, tmp)
            os.chmod(tmp, os.stat(local).st_mode & 0o777)
            os.replace(tmp, dst)


def _safe_name(name: str) -> str:
    """Check a relative device path (no absolute paths, no '..', no control characters)."""
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts) or any(ord(c) < 32 for c in name):
        raise DeviceError(f"refusing to copy to {name!r}: a file name inside the working folder must be a plain "
                          "relative path")
    return name


_SSH_FAILURES = (
    # (stderr pattern, advice)
    (r"Could not resolve hostname|Name or service not known|nodename nor servname",
     "the host name is unknown: check it, or the Host alias in your ssh config (pass a config file with "
     "--ssh-config)"),
    (r"Connection timed out|Operation timed out|timed out during banner exchange",
     "no answer within ConnectTimeout: is the device on, on this network, and is sshd running on that port?"),
    (r"Connection refused", "nothing accepts ssh connections on that port: is sshd running there?"),
    (r"No route to host|Network is unreachable", "no route to the device: check the network and the address"),
    (r"Permission denied \(|Too many authentication failures",
     "the device refused every key offered: install your public key there (ssh-copy-id) or set IdentityFile in "
     "your ssh config; edgelm runs ssh with BatchMode=yes and never asks for a password"),
    (r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED|No .* host key is known",
     "the device's host key is not in known_hosts (or has changed): connect once with plain ssh, check the "
     "fingerprint and accept it"),
    (r"Connection closed by|Connection reset by|kex_exchange_identification|Broken pipe",
     "the connection was closed by the device (sshd limits, a firewall, or the device rebooting)"),
    (r"Bad configuration option|Can't open user config file|[Cc]onfiguration file .* error|Bad owner or permissions",
     "ssh could not use its configuration"),
)


class SSHTransport(Transport):
    """The system OpenSSH client (``ssh``), with BatchMode and a ConnectTimeout."""

    tool = "ssh"

    def __init__(self, url: DeviceURL, ssh_config: str | os.PathLike[str] | None = None,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, ssh: str = "ssh",
                 options: Sequence[str] = ()) -> None:
        super().__init__(url)
        if ssh_config is not None:
            ssh_config = Path(ssh_config).expanduser()
            if not ssh_config.is_file():
                raise DeviceError(f"ssh config file {ssh_config} does not exist")
        self.ssh_config = ssh_config
        self.connect_timeout = connect_timeout
        self.ssh = ssh
        for o in options:
            if not re.fullmatch(r"[A-Za-z]+=[^\s;&|`$<>\\\"']*", o):
                raise DeviceError(f"ssh option {o!r} is not of the form Name=value")
        self.options = list(options)
        self._has_tar: bool | None = None

    def base_argv(self) -> list[str]:
        argv = [self.ssh]
        if self.ssh_config is not None:
            argv += ["-F", str(self.ssh_config)]
        argv += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, round(self.connect_timeout))}",
                 "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        for o in self.options:
            argv += ["-o", o]
        if self.url.user:
            argv += ["-l", self.url.user]
        if self.url.port:
            argv += ["-p", str(self.url.port)]
        return argv

    def command(self, script: str) -> list[str]:
        # "--" ends ssh's options; the host was validated and cannot start with '-' anyway.
        return [*self.base_argv(), "--", self.url.host, script]

    def _connection_error(self, proc: subprocess.CompletedProcess) -> str | None:
        if proc.returncode != 255:  # ssh's own failures exit 255
            return None
        err = proc.stderr or ""
        for pattern, advice in _SSH_FAILURES:
            if re.search(pattern, err):
                return f"cannot reach {self} over ssh: {_tail(err, 3)}; {advice}"
        if re.search(r"^ssh: ", err, re.M):  # some other failure of ssh itself (a remote 255 is not one)
            return f"cannot reach {self} over ssh (exit 255): {_tail(err, 3)}"
        return None

    def has_tar(self) -> bool:
        if self._has_tar is None:
            self._has_tar = self.shell("command -v tar >/dev/null 2>&1", check=False).returncode == 0
        return self._has_tar

    def push(self, files: Sequence[tuple[Path, str]], remote_dir: str, progress: Progress | None = None) -> None:
        files = [(Path(local), _safe_name(name)) for local, name in files]
        if not files:
            return
        if self.has_tar():
            self._push_tar(files, remote_dir)
        else:
            for local, name in files:
                self._push_cat(local, posixpath.join(remote_dir, name))

    def _push_tar(self, files: list[tuple[Path, str]], remote_dir: str) -> None:
        q = shlex.quote(remote_dir)
        script = f"mkdir -p {q} && tar -xf - -C {q}"

        def owner(ti: tarfile.TarInfo) -> tarfile.TarInfo:
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            return ti

        with tempfile.TemporaryFile() as err:
            try:
                p = subprocess.Popen(self.command(script), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=err)
            except FileNotFoundError as e:
                raise self._spawn_error(e) from e
            broken = None
            try:
                with tarfile.open(fileobj=p.stdin, mode="w|", format=tarfile.PAX_FORMAT) as tf:
                    for local, name in files:
                        tf.add(str(local), arcname=name, recursive=False, filter=owner)
            except BrokenPipeError as e:  # the far end went away; its stderr says why
                broken = e
            finally:
                try:
                    p.stdin.close()
                except BrokenPipeError:
                    pass
                rc = p.wait()
            err.seek(0)
            stderr = err.read().decode(errors="replace")
        proc = subprocess.CompletedProcess(p.args, rc, "", stderr)
        msg = self._connection_error(proc)
        if msg:
            raise DeviceUnreachableError(msg)
        if rc != 0 or broken:
            raise RemoteCommandError(f"copying files to {remote_dir} on {self} failed (exit {rc}): {_tail(stderr)}",
                                     proc)

    def _push_cat(self, local: Path, remote: str) -> None:
        q, tmp = shlex.quote(remote), shlex.quote(remote + ".partial")
        script = f"mkdir -p {shlex.quote(posixpath.dirname(remote))} && cat > {tmp} && mv -f {tmp} {q}"
        with open(local, "rb") as f:
            try:
                proc = subprocess.run(self.command(script), stdin=f, capture_output=True)
            except FileNotFoundError as e:
                raise self._spawn_error(e) from e
        done = subprocess.CompletedProcess(proc.args, proc.returncode, "", proc.stderr.decode(errors="replace"))
        msg = self._connection_error(done)
        if msg:
            raise DeviceUnreachableError(msg)
        if proc.returncode != 0:
            raise RemoteCommandError(f"copying {local.name} to {remote} on {self} failed: {_tail(done.stderr)}", done)


_ADB_FAILURES = (
    (r"device '.*' not found|device not found",
     "no such device is attached: `adb devices` lists the serials; connect it with USB debugging on, or "
     "`adb connect HOST:PORT` for adb over Wi-Fi"),
    (r"no devices/emulators found|no devices found",
     "no device is attached: connect one with USB debugging on (or `adb connect HOST:PORT`)"),
    (r"more than one device", "several devices are attached: name one as adb://SERIAL (see `adb devices`)"),
    (r"device unauthorized", "the device has not authorized this computer: accept the prompt on its screen"),
    (r"device offline", "the device is offline: reconnect it, or run `adb reconnect`"),
    (r"cannot connect to daemon|failed to start daemon|Connection refused",
     "the adb server could not be started or reached on this machine"),
)


class AdbTransport(Transport):
    """The ``adb`` binary: ``adb [-s SERIAL] shell`` and ``adb push``.

    Exit codes come back through adb's shell protocol (adb 24+, Android 7+).
    """

    tool = "adb"

    def __init__(self, url: DeviceURL, adb: str = "adb", server_port: int | None = None) -> None:
        super().__init__(url)
        self.adb = adb
        self.server_port = server_port

    def base_argv(self) -> list[str]:
        argv = [self.adb]
        if self.server_port is not None:
            argv += ["-P", str(int(self.server_port))]
        if self.url.serial:
            argv += ["-s", self.url.serial]
        return argv

    def command(self, script: str) -> list[str]:
        return [*self.base_argv(), "shell", script]

    def _connection_error(self, proc: subprocess.CompletedProcess) -> str | None:
        if proc.returncode == 0:
            return None
        # adb's own notes ("* daemon not running; starting now ...") are not the error
        err = "\n".join(ln for ln in (proc.stderr or "").splitlines() if not ln.startswith("* "))
        for pattern, advice in _ADB_FAILURES:
            if re.search(pattern, err):
                return f"cannot reach {self}: {_tail(err, 2)}; {advice}"
        return None

    def state(self, timeout: float = 30) -> str:
        """``adb get-state`` ("device" when usable); raises :class:`DeviceUnreachableError` otherwise."""
        argv = [*self.base_argv(), "get-state"]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError as e:
            raise self._spawn_error(e) from e
        except subprocess.TimeoutExpired as e:
            raise DeviceUnreachableError(f"`{' '.join(argv)}` did not answer within {timeout:.0f} s") from e
        msg = self._connection_error(proc)
        if msg:
            raise DeviceUnreachableError(msg)
        if proc.returncode != 0:
            raise DeviceUnreachableError(f"cannot reach {self}: {_tail(proc.stderr or proc.stdout, 2)}")
        return proc.stdout.strip()

    def push_commands(self, files: Sequence[tuple[Path, str]], remote_dir: str) -> list[list[str]]:
        """The argv lists :meth:`push` runs (mkdir of each folder, then one ``adb push`` per file)."""
        files = [(Path(local), _safe_name(name)) for local, name in files]
        dirs = sorted({posixpath.dirname(posixpath.join(remote_dir, name)) for _, name in files})
        cmds = [self.command("mkdir -p " + " ".join(shlex.quote(d) for d in dirs))] if dirs else []
        cmds += [[*self.base_argv(), "push", str(local), posixpath.join(remote_dir, name)] for local, name in files]
        return cmds

    def push(self, files: Sequence[tuple[Path, str]], remote_dir: str, progress: Progress | None = None) -> None:
        for argv in self.push_commands(files, remote_dir):
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                      errors="replace")
            except FileNotFoundError as e:
                raise self._spawn_error(e) from e
            msg = self._connection_error(proc)
            if msg:
                raise DeviceUnreachableError(msg)
            if proc.returncode != 0:
                raise RemoteCommandError(f"`adb {' '.join(argv[1:3])} ...` failed on {self}: "
                                         f"{_tail(proc.stderr or proc.stdout)}", proc)


def open_transport(url: str | DeviceURL, *, ssh_config: str | os.PathLike[str] | None = None,
                   connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> Transport:
    """A transport for ``url`` (see the module doc)."""
    u = parse_device_url(url)
    if u.scheme == "local":
        return LocalTransport(u)
    if u.scheme == "adb":
        return AdbTransport(u)
    return SSHTransport(u, ssh_config=ssh_config, connect_timeout=connect_timeout)
