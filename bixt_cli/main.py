"""Entry point of `bixt`: importing a command module registers its commands on the app."""
import bixt_cli.train  # noqa: F401  (train, eval)
from bixt_cli import measure, models, tune  # noqa: F401
from bixt_cli.app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
