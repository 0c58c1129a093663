"""fed-ser: federated speech emotion recognition on Flower, and what its shared updates leak.

The pipeline, one sub-package a stage: ``data`` -> ``features`` -> ``core`` (model, local training,
schedule, aggregation) -> ``run`` (settings, a client's update with its defences, DP spent) ->
``flower`` and ``engines`` (federated training) + ``recording`` (the eavesdropper's store) ->
``attacks`` / ``defenses`` (top-level packages) -> ``experiments`` (CLI, orchestration, reports);
``deployment`` runs a real federation.
"""
