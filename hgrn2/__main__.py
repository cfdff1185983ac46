"""``python -m hgrn2`` runs the ``hgrn2`` LightningCLI."""

from lightning_modules.cli import main

if __name__ == "__main__":
    main()
