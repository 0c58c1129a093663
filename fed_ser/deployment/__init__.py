"""A real federation: SuperLink and SuperNodes as processes over HTTPS with TLS and node authentication,
in a private network of the deployer's (:mod:`.federation`, :mod:`.isolation`, :mod:`.certificates`,
:mod:`.processes`, :mod:`.staging`), the Fleet-only gateway of the compose demo (:mod:`.gateway`, :mod:`.shards`)
and the warm app processes (:mod:`.warm_apps`). Below the experiments: ``fed-ser-deploy`` drives it
(:mod:`fed_ser.experiments.deploy`)."""
