import sys

from moeshrink.cli import main

sys.exit(main())
