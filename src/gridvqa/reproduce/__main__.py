import sys

from gridvqa.reproduce import main

sys.exit(main())
