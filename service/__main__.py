"""`python -m service ...` is the `rtmdet` program."""
import sys

from service.cli import main

sys.exit(main())
