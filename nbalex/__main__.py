"""``python -m nbalex`` is the ``nbalex`` command."""

from nbalex.cli import main

if __name__ == "__main__":
    main()
