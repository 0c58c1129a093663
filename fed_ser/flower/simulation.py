"""Run the ServerApp/ClientApp pair in Flower's simulation engine on Ray."""

from __future__ import annotations

import logging
import os

from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from fed_ser.flower.client_app import make_client_app
from fed_ser.flower.server_app import make_server_app
from fed_ser.run.settings import RunSettings


def simulate(settings: RunSettings, num_supernodes: int, cpus_per_client: float = 1.0,
             ray_address: str | None = None, verbose: bool = False, client_app: ClientApp | None = None) -> None:
    """Simulate ``num_supernodes`` nodes (clients 0..n-1, Flower's partition-id) with ``settings``.

    ``ray_address`` attaches to a running Ray cluster (``ray start --head``) instead of starting
    a local one. Each ClientApp uses one CPU by default (Flower's default of 2 would run one
    client at a time on a 2-core machine). ``client_app`` replaces fed-ser's ClientApp for ``settings`` (the privacy
    audit's, with canary clients: :mod:`fed_ser.flower.canary`).
    """
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    init_args: dict = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": verbose}
    if ray_address:
        init_args = {"address": ray_address, "logging_level": logging.ERROR}
    else:
        init_args.update(num_cpus=os.cpu_count() or 1, address="local")  # a fresh local Ray, never a leftover cluster
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(
        server_app=make_server_app(settings), client_app=client_app or make_client_app(settings), num_supernodes=num_supernodes,
        backend_name="ray",
        backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}, "init_args": init_args},
        verbose_logging=verbose,
    )
