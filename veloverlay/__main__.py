from veloverlay.cli import main
import sys

sys.exit(main())
