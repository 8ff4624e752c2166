"""`python -m memorymamba ...` (and `torchrun -m memorymamba train ...`) = the `memorymamba` command."""
import sys

from memorymamba.cli import main

sys.exit(main())
