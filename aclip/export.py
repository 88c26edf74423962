"""``python -m aclip.export``, the documented command (code: ``aclip.interop.export``)."""

import sys

from aclip.interop.export import main

if __name__ == "__main__":
    sys.exit(main())
