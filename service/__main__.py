"""`python -m service ...` is the `rtmdet` program."""
import os
import sys

from service.serve_env import set_wait_policy

if sys.argv[1:2] == ["serve"]:
    set_wait_policy(os.environ)  # before anything can import torch (and with it OpenMP)

from service.cli import main  # noqa: E402

sys.exit(main())
