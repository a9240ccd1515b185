"""``fl-sim deploy``: the same apps on Flower's deployment engine on this machine (TLS SuperLink, SuperNodes)."""

from __future__ import annotations

from pathlib import Path

import typer

from fl_sim.cli.common import fail, resolve_cli
from fl_sim.config import ConfigError, check_feasible


def deploy(
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                          help="run-config overrides; num-supernodes SuperNodes are started"),
    out: Path = typer.Option(None, "--out", help="run directory to create (default: out-dir/run-name)"),
    workdir: Path = typer.Option(None, "--workdir", help="certificates, Flower state and logs (default: a temporary "
                                                        "folder, deleted afterwards)"),
    insecure: bool = typer.Option(False, "--insecure", help="no TLS"),
    node_auth: bool = typer.Option(False, "--node-auth", help="SuperNode authentication (needs ssh-keygen)"),
) -> None:
    """Run on Flower's deployment engine on this machine: a TLS SuperLink and num-supernodes SuperNodes on
    127.0.0.1, then `flwr run`; every process is stopped afterwards. See docs/deployment.md for real machines."""
    import tempfile

    from fl_sim.cli.run import print_summary
    from fl_sim.deployment import LocalFederation
    from fl_sim.results import default_run_name
    from fl_sim.server_app import prepare_run_dir

    try:
        cfg = resolve_cli(overrides, out)
        if not cfg["run-name"]:
            cfg["run-name"] = default_run_name(cfg)
        cfg["out-dir"] = str(Path(str(cfg["out-dir"])).expanduser().resolve())
        check_feasible(cfg)
        prepare_run_dir(cfg)
    except ConfigError as exc:
        fail(str(exc))
    with tempfile.TemporaryDirectory(prefix="fl-sim-deploy-") as tmp:
        fed = LocalFederation(workdir or Path(tmp), int(cfg["num-supernodes"]), tls=not insecure,
                              node_auth=node_auth)
        try:
            with fed:
                proc = fed.run(cfg, timeout_s=None)
        except KeyboardInterrupt:
            fail("interrupted; every SuperLink/SuperNode process was stopped", code=130)
        if proc.returncode != 0:
            typer.echo(proc.stdout[-3000:] + proc.stderr[-3000:] + fed.logs(), err=True)
            fail(f"flwr run exited with code {proc.returncode}", code=1)
    from fl_sim.results import run_dir_for

    print_summary(run_dir_for(cfg))


