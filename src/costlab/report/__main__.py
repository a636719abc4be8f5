"""``python -m costlab.report``: rebuild a sweep's report from MLflow alone."""

import sys

from costlab.report import main

sys.exit(main())
