"""Attribute inference from recorded updates: infer a client's gender from what it shared.

The paper's per-layer CNN with weighted fusion (:mod:`~attacks.inference.model`,
:mod:`~attacks.inference.train`) on the attack data set of shadow updates
(:mod:`~attacks.inference.data`); the input-profile attack (:mod:`~attacks.inference.profile`);
exact FedSGD batch inversion (:mod:`~attacks.inference.inversion`) and the feature-space attack
built on it (:mod:`~attacks.inference.feature_space`); ASR with intervals, AUC and TPR at low FPR
(:mod:`~attacks.inference.evaluate`). Reads the update store only; knows nothing of Flower.
"""
