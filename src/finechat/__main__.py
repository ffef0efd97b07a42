import sys

from finechat.cli import main

sys.exit(main())
