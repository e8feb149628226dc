import sys

from graphcap.cli import main

sys.exit(main())
