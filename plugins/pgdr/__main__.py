import sys

from pgdr.cli import main

sys.exit(main())
