import sys

from kdcli.cli import main

sys.exit(main())
