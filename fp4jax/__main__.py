import sys

from fp4jax.cli import main

sys.exit(main())
