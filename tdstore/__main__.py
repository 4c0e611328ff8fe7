from tdstore.cli import run

run()
