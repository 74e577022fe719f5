"""`python -m service ...` is the `rtmdet` program."""
import os
import sys

from service.serve_env import set_wait_policy

if sys.argv[1:2] == ["serve"]:
    set_wait_policy(os.environ)  # before torch (imported by service.cli) loads OpenMP

from service.cli import main  # noqa: E402

sys.exit(main())
