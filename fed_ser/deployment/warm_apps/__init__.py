"""Warm app processes for a real federation: a fork server with Flower's runtime and the app's
libraries imported once (:mod:`.forkserver`), and the stdlib-only launcher that Flower's SuperExecs
run in place of ``flwr-clientapp`` / ``flwr-serverapp`` (:mod:`.launcher`). Tooling around Flower,
not part of the app: neither imports ``flwr`` (the server imports Flower's entry points by name)."""
