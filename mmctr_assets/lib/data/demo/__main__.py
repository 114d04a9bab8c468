"""``python -m mmctr_assets.lib.data.demo``: the ``mmctr-demo-data`` command."""

import sys

from mmctr_assets.lib.data.demo.generator import main

sys.exit(main())
