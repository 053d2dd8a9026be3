"""`python -m xray_ray.data inspect ...`: the same as `xray-ray inspect ...`."""

import sys

from xray_ray.data.inspect import main

sys.exit(main())
