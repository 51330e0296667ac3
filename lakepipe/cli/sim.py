"""``lakepipe sim …``: the virtual survey outside a pipeline (the archive emulator)."""

from __future__ import annotations

import logging

import typer

from lakepipe.cli.common import app, err_console, handle_errors, parse_options
from lakepipe.errors import UserError

sim_app = typer.Typer(help="The embedded virtual survey.", no_args_is_help=True)
app.add_typer(sim_app, name="sim")


@sim_app.command("serve")
@handle_errors
def serve(
    port: int = typer.Option(8765, "--port", help="TCP port on --host (0: any free port)"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on"),
    pipeline: str | None = typer.Option(
        None, "--pipeline", "-p", help="Serve the survey of this pipeline's `archive: {kind: sim}`"
    ),
    param: list[str] | None = typer.Option(
        None, "--param", help="Survey parameter KEY=VALUE (seed=7, naxis1=1024, …)"
    ),
    fault: list[str] | None = typer.Option(
        None, "--fault", help="Fault injection KEY=VALUE (error_503_prob=0.2, latency_s=0.05, …)"
    ),
) -> None:
    """Serve the virtual survey over HTTP through the real archives' APIs (IRSA IBE for
    ZTF, CDS XMatch and VizieR), for testing archive clients offline.

    Example: lakepipe sim serve --port 8765 --param seed=7 --fault error_503_prob=0.2
    """
    from pydantic import ValidationError

    from lakepipe.archives.sim import SimArchive
    from lakepipe.sim.emulator import Faults
    from lakepipe.sim.emulator import serve as run_server

    params = parse_options(param)
    if pipeline:
        from lakepipe.spec import load_spec

        loaded = load_spec(pipeline)
        archive = loaded.model.archive
        if archive is None or archive.kind != "sim":
            raise UserError(f"pipeline {pipeline!r} has no `archive: {{kind: sim}}` to serve")
        params = {**archive.model_dump(exclude={"kind"}), **params}
    try:
        sim_params = SimArchive.Params(**params)
        faults = Faults(**parse_options(fault))
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise UserError(
            f"{loc}: {first['msg']}; see `lakepipe kinds sim` for survey parameters"
        ) from None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    err_console().print(
        f"serving the virtual survey (seed {sim_params.seed}) on http://{host}:{port} — "
        "point a spec at it with `archive: {kind: ztf, base_url: http://HOST:PORT}`; "
        "Ctrl-C stops",
        markup=False,
    )
    run_server(SimArchive(sim_params), host=host, port=port, faults=faults)
