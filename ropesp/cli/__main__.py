import sys

from ropesp.cli import main

sys.exit(main())
