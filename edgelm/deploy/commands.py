"""The command-line side of deploying: ``edgelm deploy`` and ``edgelm bench --device``.

:mod:`edgelm.cli` adds :func:`deploy_command` to its group and decorates ``bench`` with
:func:`device_options`; only click is imported here at import time.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import click

DEVICE_HELP = "The device: ssh://[user@]host[:port], an ssh Host alias, adb://SERIAL, or local."


def device_options(required: bool) -> Any:
    """--device, --workdir, --ssh-config, --install/--no-install, --python, --connect-timeout, --pip-arg."""

    def deco(f):
        opts = [
            click.option("-d", "--device", required=required, default=None,
                         envvar="EDGELM_DEVICE" if required else None,
                         help=f"{DEVICE_HELP} [env EDGELM_DEVICE]" if required
                         else DEVICE_HELP.replace("The device", "Run on this device (after deploying the bundles)")),
            click.option("--workdir", default=None,
                         help="Working folder on the device (default: the bundle's target profile, else ~/edgelm; "
                              "/data/local/tmp/edgelm over adb). Nothing outside it is touched."),
            click.option("--ssh-config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                         envvar="EDGELM_SSH_CONFIG", help="ssh config file to use (ssh -F). [env EDGELM_SSH_CONFIG]"),
            click.option("--install/--no-install", default=True, show_default=True,
                         help="Create a venv in the workdir and pip-install what the bundle needs when missing "
                              "(--no-install: fail and say what is missing)."),
            click.option("--python", "device_python", default=None,
                         help="Python on the device that makes the venv (default: the target profile's, "
                              "else python3)."),
            click.option("--connect-timeout", type=click.IntRange(1, 600), default=10, show_default=True,
                         help="Seconds to wait for the device to answer (ssh ConnectTimeout)."),
            click.option("--pip-arg", "pip_args", multiple=True,
                         help="Extra argument for pip on the device, repeatable (e.g. "
                              "--pip-arg=--extra-index-url=https://download.pytorch.org/whl/cpu)."),
        ]
        for opt in reversed(opts):
            f = opt(f)
        return f

    return deco


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


@click.command("deploy")
@click.argument("bundle", type=click.Path(path_type=Path))
@device_options(required=True)
@click.option("--system-site-packages", is_flag=True,
              help="Make the venv see the device's system packages (e.g. python3-numpy from apt).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def deploy_command(bundle: Path, device: str, workdir: str | None, ssh_config: Path | None, install: bool,
                   device_python: str | None, connect_timeout: int, pip_args: tuple[str, ...],
                   system_site_packages: bool, as_json: bool) -> None:
    """Copy BUNDLE to a device, make sure it can run it there, and verify it there.

    Files whose sha256 already matches on the device are not sent again. The device gets
    WORKDIR/bundles/NAME, WORKDIR/src (edgelm's device side) and WORKDIR/venv.
    """
    from edgelm.deploy import deploy

    r = deploy(bundle, device, workdir, install, ssh_config=ssh_config, python=device_python,
               connect_timeout=connect_timeout, system_site_packages=system_site_packages, pip_args=pip_args,
               progress=None if as_json else _echo_err)
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
        return
    emulated = " (emulated board)" if r.emulated else ""
    installed = f"installed {' '.join(r.installed)}" if r.installed else "nothing to install"
    click.echo(f"{r.device}{emulated}: {r.bundle} ({r.format}, {r.machine}); sent {len(r.sent)} file(s), "
               f"{len(r.skipped)} already there; {installed}; checksums verified on the device "
               f"({r.timings['total_s']:.1f} s)")
    there = f"cd {shlex.quote(r.workdir)} && {shlex.quote(r.python)} -m edgelm.cli"
    click.echo(f"run it there:  {there} run {shlex.quote(r.bundle)} \"Hello\" --stats")
    click.echo(f"chat there:    {there} chat {shlex.quote(r.bundle)}")


def run_device_bench(bundles: tuple[Path, ...], device: str, *, workdir: str | None, ssh_config: Path | None,
                     install: bool, device_python: str | None, connect_timeout: int, threads: int | None,
                     runs: int, warmup: int, new_tokens: int, prompt: str | None, json_out: Path | None,
                     pip_args: tuple[str, ...] = (), draft: Path | None = None,
                     draft_tokens: int = 5, lookup: int = 0,
                     sampling: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """``edgelm bench BUNDLE... --device URL``: deploy each bundle, time it there, print a table.
    With ``draft`` (``lookup``) every bundle gets a second row decoding speculatively with it
    (with prompt lookup)."""
    from edgelm.deploy.remote_bench import (
        EMULATED_NOTE,
        bench_on_device,
        describe_device,
        format_device_table,
        write_report,
    )
    from edgelm.deploy.transports import open_transport

    t = open_transport(device, ssh_config=ssh_config, connect_timeout=connect_timeout)
    results = []
    for b in bundles:
        variants: list[dict[str, Any]] = [{}]
        if draft is not None:
            variants.append({"draft": draft})
        if lookup:
            variants.append({"lookup": lookup})
        for v in variants:
            how = f" with draft {v['draft']}" if "draft" in v else " with prompt lookup" if v else ""
            _echo_err(f"deploying and running {b}{how} on {t}...")
            results.append(bench_on_device(b, device, workdir=workdir, install=install, python=device_python,
                                           prompt=prompt, new_tokens=new_tokens, runs=runs, warmup=warmup,
                                           threads=threads, pip_args=pip_args, progress=_echo_err, transport=t,
                                           draft_tokens=draft_tokens, sampling=sampling, **v))
    first = results[0]
    click.echo(f"device: {describe_device(first['device'], first.get('threads'))}; {new_tokens} new tokens, "
               f"median (p10–p90) of {runs} runs after {warmup} warm-up")
    click.echo(format_device_table(results))
    if any(r.get("emulated") for r in results):
        click.secho(f"warning: {EMULATED_NOTE}", fg="yellow", err=True)
    if json_out:
        write_report(results, json_out)
        _echo_err(f"wrote {json_out}")
    return results
