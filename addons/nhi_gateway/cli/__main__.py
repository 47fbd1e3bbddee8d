"""``python -m nhi_gateway.cli``: the ``nhi-gateway`` command."""

import sys

from nhi_gateway.cli.main import main

sys.exit(main())
