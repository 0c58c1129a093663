"""fed-ser: federated speech emotion recognition on Flower, and what its shared updates leak.

The pipeline, one sub-package a stage: ``data`` -> ``features`` -> ``core`` (model, local training,
schedule, aggregation) -> ``run`` (settings, a client's update with its defences, DP spent) ->
``flower`` and ``engines`` (federated training) + ``recording`` (the eavesdropper's store) ->
``attacks`` / ``defenses`` (top-level packages) -> ``experiments`` (CLI, orchestration, reports);
``deployment`` runs a real federation.
"""

import os as _os

# Flower posts usage events to telemetry.flower.ai from every process it starts (ServerApp,
# ClientApp, Ray actors, the CLI); fed-ser never talks to any address but 127.0.0.1. Set before
# any fed-ser module imports flwr (it reads the variable at import); an explicit value wins.
_os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
