"""A stand-in for Flower's ``flwr-clientapp`` entry point, run by the fork server in tests/test_message_path.py:
it reports what a forked ClientApp process would see (its command line, environment, working
directory, parent, which modules it inherited, a draw of numpy's and torch's global generators), then
exits with ``--code`` or sleeps for ``--sleep``."""

from __future__ import annotations

import json
import os
import sys
import time


def report() -> None:
    import numpy as np
    import torch

    print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "mark": os.environ.get("FED_SER_TEST_MARK"),
                      "pid": os.getpid(), "ppid": os.getppid(), "torch": "torch" in sys.modules,
                      "own": sorted(m for m in sys.modules if m.split(".")[0] in ("fed_ser", "attacks", "defenses")),
                      "np_random": float(np.random.rand()), "torch_random": float(torch.rand(1))}),
          flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if "--sleep" in sys.argv:
        time.sleep(float(sys.argv[sys.argv.index("--sleep") + 1]))
    sys.exit(int(sys.argv[sys.argv.index("--code") + 1]) if "--code" in sys.argv else 0)
