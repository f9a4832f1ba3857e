"""``python -m brittle.serve MONITOR.onnx [--host --port --max-batch ...]``."""

import sys

from brittle.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
