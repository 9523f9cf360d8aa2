"""``python -m tensorfold``: the same command line as the ``tensorfold`` script."""

from tensorfold.cli.main import app

if __name__ == "__main__":
    app(prog_name="tensorfold")
