"""`python -m runner.serving --artifact DIR --port N [--host H] [--api-key-env VAR] [--max-batch 16 ...]`."""

from runner.serving.server import main

main()
