import sys

from omni_runtime.cli import main

sys.exit(main())
