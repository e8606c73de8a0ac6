"""``python -m diffaudit`` runs the command line."""

from diffaudit.cli import main

main()
