"""``python -m lakepipe``."""

from lakepipe.cli import main

if __name__ == "__main__":
    main()
