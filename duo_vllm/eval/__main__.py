import sys

from duo_vllm.eval.cli import main

sys.exit(main())
