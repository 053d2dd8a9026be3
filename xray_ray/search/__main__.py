"""`python -m xray_ray.search ...`: the same as `xray-ray search ...`."""

import sys

from xray_ray.search.command import main

sys.exit(main())
