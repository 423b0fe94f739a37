import sys

from gridvqa.data.synthetic.cli import main

sys.exit(main())
