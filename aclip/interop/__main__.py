"""``python -m aclip.interop``: describe the CLIP a weights file or folder holds."""

from aclip.interop.describe import main

raise SystemExit(main())
