"""Federated training without Flower, same arithmetic as the Flower path: the in-process loop
(reference, defences) and the vectorised engine (all clients of a round under ``torch.func.vmap``)."""
