"""``python -m simulators.linklevel``: serve simulated devices over HCI on TCP."""

import sys

from simulators.linklevel.remote import main

sys.exit(main())
