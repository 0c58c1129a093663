"""One federated run as configured: its settings (:mod:`~fed_ser.run.settings`, every knob declared once),
what a client sends under them, defences included (:mod:`~fed_ser.run.client`), and what its DP
spends per client (:mod:`~fed_ser.run.privacy`). Above the core and the defence mechanisms; the
engines, the Flower apps and the experiments build on it."""
