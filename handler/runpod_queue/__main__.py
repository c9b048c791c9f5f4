import sys

from handler.runpod_queue.handler import main

sys.exit(main())
