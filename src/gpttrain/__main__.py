import sys

from gpttrain.cli import main

sys.exit(main())
