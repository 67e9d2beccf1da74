"""``python -m edge_node node|fleet``: the device-side commands without the cloud CLI."""

import logging

import typer

from edge_node.cli import fleet_app, node_app

app = typer.Typer(name="edge_node", no_args_is_help=True, add_completion=False)
app.add_typer(node_app, name="node")
app.add_typer(fleet_app, name="fleet")

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    app()
