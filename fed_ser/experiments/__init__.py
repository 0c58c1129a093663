"""The experiments a user runs: configuration, data preparation, the attack and defence grids,
adversarial robustness, and their reports."""
