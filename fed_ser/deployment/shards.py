"""What one node of a real federation may hold: its own client's rows of the prepared data set.

In simulation every node reads the one prepared file; on a real federation each node's container gets a
file of the same name and format holding only its client's training and validation rows. The other
clients' speaker, gender and corpus are blanked (the gender is what the attacks infer), and the held-out
test speakers are left out; only the client count and feature width, which the ClientApp needs, stay.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fed_ser.data.federated import FederatedData


def _only(values: np.ndarray, keep: int) -> np.ndarray:
    out = np.zeros_like(values)
    out[keep] = values[keep]
    return out


def client_shard(data: FederatedData, client: int) -> FederatedData:
    """``data`` reduced to what the node holding ``client`` needs (see the module docstring)."""
    if not 0 <= client < data.num_clients:
        raise IndexError(f"client {client} out of range: this data set has {data.num_clients} clients")
    rows = data.client == client
    return FederatedData(X=data.X[rows], y=data.y[rows], client=data.client[rows], split=data.split[rows],
                         client_speaker=_only(data.client_speaker, client), client_gender=_only(data.client_gender, client),
                         client_corpus=_only(data.client_corpus, client))


def write_shards(prepared: Path, folders: list[Path]) -> list[Path]:
    """Node ``i``'s shard of ``prepared`` as ``folders[i]/<prepared's name>``; returns the paths."""
    data = FederatedData.load(prepared)
    paths = []
    for i, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        client_shard(data, i).save(folder / prepared.name)
        paths.append(folder / prepared.name)
    return paths
