"""``python -m brittle.serve MONITOR.onnx [--host --port ...]``: see ``brittle.deploy.serve``."""

import sys

from brittle.deploy.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
