import sys

from ipex_lars.cli import main

sys.exit(main())
