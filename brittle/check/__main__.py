"""``python -m brittle.check``."""

from brittle.check import main

if __name__ == "__main__":  # not when imported, e.g. by pytest --doctest-modules
    raise SystemExit(main())
