"""python -m unet_np.cli: the unet-np command."""
import sys

from . import main

sys.exit(main())
