import sys

from llm_neo.cli import main

sys.exit(main())
