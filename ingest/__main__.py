"""``python -m ingest`` runs the popvault command line."""

from ingest.cli import main

main()
