import sys

from sana.cli import main

sys.exit(main())
