import sys

from spotckpt.cli import main

sys.exit(main())
