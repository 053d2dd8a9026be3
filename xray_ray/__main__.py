"""`python -m xray_ray <command> ...`: the same as the `xray-ray` console command."""

import sys

from xray_ray.cli import main

sys.exit(main())
