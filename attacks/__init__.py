"""Attacks on federated SER, in two families that share nothing but the name (no Flower imports).

- :mod:`attacks.inference`: attribute inference: a curious server (or any observer of the shared
  updates) infers a client's gender from its recorded updates. This is what fed-ser measures.
- :mod:`attacks.evasion`: adversarial examples (FGSM, PGD) that make the trained SER model
  misclassify an utterance.
"""
