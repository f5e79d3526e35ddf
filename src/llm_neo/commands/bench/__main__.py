"""`python -m llm_neo.commands.bench --_child SPEC`: one isolated run (see `isolate.main`)."""

import os
import sys
import warnings

from llm_neo.commands.bench.isolate import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    sys.exit(main())
