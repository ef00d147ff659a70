import sys

from frugalvit.cli.main import main

sys.exit(main())
