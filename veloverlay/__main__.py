import sys

from veloverlay.cli import main

sys.exit(main())
