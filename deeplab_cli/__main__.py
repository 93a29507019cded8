"""``python -m deeplab_cli`` runs the ``deeplab`` command."""

from deeplab_cli.cli import main

if __name__ == "__main__":
    main()
