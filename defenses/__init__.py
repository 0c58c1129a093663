"""Defences (no Flower imports), in two families.

- :mod:`defenses.privacy`: differential privacy against attribute inference from updates:
  DP-FedSGD with Opacus (:mod:`~defenses.privacy.dp_fedsgd`), user-level DP
  (:mod:`~defenses.privacy.user_dp`), the paper's UDP as published (:mod:`~defenses.privacy.udp`),
  the RDP accountant (:mod:`~defenses.privacy.accounting`), what Flower's DP guarantees and to
  whom (:mod:`~defenses.privacy.central`) and the empirical audit's canary (:mod:`~defenses.privacy.audit`).
  What a run's clients spend is reported one layer up, by :mod:`fed_ser.run.privacy`.
- :mod:`defenses.evasion`: against adversarial examples: federated adversarial training and
  test-time randomisation.

Dropout is a model setting (``model.dropout``).
"""
